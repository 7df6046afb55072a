"""Training: the optimizer (`optim`), the jitted steps and programs (`step`), the resumable loop
(`loop`) and the stage directory on disk (`checkpoint`). The loop's public names are here too."""

from jaxprune.train.loop import EpochCallback, StepHook, TrainOptions, fit, fit_copies
from jaxprune.train.optim import (SCHEDULES, OptimizerConfig, add_bn_scale_l1,
                                  learning_rate_schedule, learning_rates, make_optimizer)
from jaxprune.train.step import (PRECISIONS, WEIGHT_MASKS, Evaluator, Masks, Trainer, TrainState,
                                 compute_dtype, cross_entropy, eval_step, evaluate_variables,
                                 keep_multipliers, make_mesh, train_step, trainer_for)
