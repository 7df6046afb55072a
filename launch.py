r"""Train a baseline, prune it with a criterion, retrain the pruned network in a regime, report.

    python launch.py --criterion=taylor --regime=scratch

Every stage lives in --workdir (default: named from the settings, beside a baseline shared by
every run of the same baseline settings) and resumes after a crash or preemption; rerunning a
finished command only prints its summary. Every flag is a setting of
`jaxprune.pipeline.config.SETTINGS`; WORKDIR/launch.flags stores a run's settings, and
`--flagfile=WORKDIR/launch.flags` reruns it.

With --multihost every process of a pod (or cluster, or `python -m jaxprune.local_cluster`)
runs this same command; process 0 prints the table.

Exit status: 0 done; 1 a bad setting or data file, a work directory in use, or storage that
cannot be written (one sentence); 3 training diverged (the last good checkpoint is kept; rerun
with a smaller lr); 75 preempted, 130 interrupted by Ctrl-C (rerun the same command).
"""

import contextlib
import sys

import jax
from absl import app, flags, logging

from jaxprune import multihost, pipeline
from jaxprune.errors import ConfigError, exit_on_user_error
from jaxprune.kernels import compiler
from jaxprune.train import checkpoint

pipeline.config.define_flags()
# --help lists them as this program's own flags.
flags.adopt_module_key_flags(pipeline.config)
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}; all settings are --flags (see --help).")
  with exit_on_user_error():
    config = pipeline.from_flags(FLAGS)
    pipeline.validate(config)
    if config.multihost:
      multihost.initialize(config.coordinator_address, config.num_processes, config.process_id,
                           timeout_s=config.multihost_timeout)
      for setting in ('workdir', 'baseline_dir'):
        if getattr(config, setting):
          multihost.check_shared(pipeline.stages.absolute(getattr(config, setting)), setting)
    elif config.coordinator_address or config.num_processes or config.process_id is not None:
      raise ConfigError('coordinator_address, num_processes and process_id are settings of a '
                        'multi-process run; add multihost.',
                        settings=('multihost', *multihost.SETTINGS))
    compiler.use_persistent_cache(config.compilation_cache_dir)
    # Several processes stop together through JAX's preemption service instead (SIGNALS).
    with contextlib.nullcontext() if config.multihost else checkpoint.SIGNALS.installed():
      results = pipeline.run(config)
  # A pod's workers print into one terminal (gcloud ... --worker=all): one table.
  if jax.process_index() == 0:
    print(pipeline.format_table(results))
    print(f"results: {config.workdir}/results.json")


def _quiet_libraries(record) -> bool:
  # Orbax logs every checkpoint write at INFO; the per-epoch progress lines are ours. A
  # failed asynchronous write (a full disk) is also logged by asyncio with orbax's
  # traceback; the error line at exit says what failed.
  if record.name == 'asyncio' and 'exception was never retrieved' in record.getMessage():
    return False
  return '/orbax/' not in record.pathname and '/absl/' not in record.pathname


if __name__ == '__main__':
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_quiet_libraries)
  app.run(main, flags_parser=pipeline.config.parse_command_line)
