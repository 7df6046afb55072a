"""The main job as resumable stages of a work directory: baseline -> prune -> regimes -> results.

    config = pipeline.make(model='resnet20', criterion='taylor', regime='scratch')
    results = pipeline.run(config)

`config` declares every setting once; `stages` holds the stage functions (`load_data`,
`baseline`, `prune`, `retrain`) for a notebook or an experiment that wants them one by one.
"""

from jaxprune.pipeline.config import (SETTINGS, STAGES, Config, Setting, from_flags, make,
                                      regimes_of, stage_settings, validate)
from jaxprune.pipeline.results import format_table
from jaxprune.pipeline.seeds import run, seed_batching_for
from jaxprune.pipeline.stages import (Baseline, Data, PruneOutcome, baseline, load_data, prune,
                                      retrain, scoring_batches)
