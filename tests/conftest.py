"""Shared fixtures: a quick tiny-model configuration, and launch.py as a user runs it."""

import logging
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The quickest full pipeline: the tiny CNN on 256 digits, one epoch per stage.
QUICK = {'model': 'tiny', 'epochs': 1, 'batch_size': 32, 'max_train': 256, 'finetune_epochs': 1}
QUICK_FLAGS = tuple(f'--{k}={v}' for k, v in QUICK.items())


@pytest.fixture
def quick_config(tmp_path):
  """quick_config(**settings): a pipeline Config of QUICK in tmp_path/work, with overrides."""
  from jaxprune import pipeline

  def make(**settings):
    return pipeline.make(**{'workdir': str(tmp_path / 'work'), **QUICK, **settings})
  return make


def count_compiles(caplog, fn, name: str):
  """fn()'s result and how many programs whose name contains `name` it compiled."""
  import jax
  jax.config.update('jax_log_compiles', True)
  try:
    with caplog.at_level(logging.WARNING):
      caplog.clear()
      out = fn()
  finally:
    jax.config.update('jax_log_compiles', False)
  return out, sum(1 for r in caplog.records
                  if 'Compiling' in r.getMessage() and name in r.getMessage())


def launch_command(*flags, workdir) -> list[str]:
  """The launch.py command line for `flags`.

  No persistent compilation cache unless a test names one: each run compiles, as the
  compile-counting tests expect, and nothing is written outside tmp_path.
  """
  if not any(f.startswith('--compilation_cache_dir') for f in flags):
    flags += ('--compilation_cache_dir=',)
  return [sys.executable, str(ROOT / 'launch.py'), f'--workdir={workdir}', *flags]


@pytest.fixture
def launch():
  """launch(*flags, workdir, env=None): runs launch.py in a process; returns CompletedProcess."""
  def run(*flags, workdir, env=None):
    return subprocess.run(launch_command(*flags, workdir=workdir), capture_output=True,
                          text=True, cwd=ROOT, timeout=600,
                          env=None if env is None else {**os.environ, **env})
  return run
