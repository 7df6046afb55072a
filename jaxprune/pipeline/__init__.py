"""The main job as resumable stages of a work directory: baseline -> prune -> regimes -> results."""

from jaxprune.pipeline.stages import *  # noqa: F401,F403
