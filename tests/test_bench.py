"""The benchmark scripts answer a bad setting with one sentence, not a traceback."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     'experiments', 'bench')


def bench(script, *args):
  proc = subprocess.run([sys.executable, os.path.join(BENCH, script), *args],
                        capture_output=True, text=True, timeout=300)
  return proc.returncode, proc.stderr


@pytest.mark.parametrize('script, args, sentence', [
    ('latency.py', ['--models=foo'], "error: unknown model 'foo'; choose one of:"),
    ('latency.py', ['--vgg_targets=0.5,abc'],
     '--vgg_targets entries are fractions of the MACs in (0, 1], e.g. 0.5,0.25.'),
    ('latency.py', ['--round_to=0'], '--round_to entries are whole numbers >= 1, e.g. 1,8.'),
    ('conv_rule.py', ['--shapes=32x32x16'],
     "--shapes entry '32x32x16' is not 'size:cin:cout:kernel:stride'"),
    ('conv_rule.py', ['--passes=fwd,dw'], "--passes ['dw'] are not among fwd, dx, dk."),
    ('throughput.py', ['--steps=0'], 'flag --steps=0: 0 is not a positive integer'),
    ('criteria_cost.py', ['--criteria=l1,bogus'], "--criteria ['bogus'] are not criteria; "
     'choose from random,'),
    # compiles.py runs each pipeline in a worker process: the worker's sentence is passed on.
    ('compiles.py', ['--regime=bogus'], "error: unknown --regime 'bogus'; choose one of:"),
    # seeds.py runs launch.py: launch.py's sentence is passed on.
    ('seeds.py', ['--data_path=/nope.npz'], "error: npz file '/nope.npz' does not exist."),
    ('seeds.py', ['--seeds=0'], 'flag --seeds=0: 0 is not a positive integer'),
    # The sample npz has no default place on a machine: the scripts that read it ask for it.
    ('seeds.py', [], '--data_path is required: the .npz of the CIFAR-10 sample'),
    ('epoch_throughput.py', ['--frameworks=jax'],
     '--data_path is required: the .npz of the CIFAR-10 sample'),
])
def test_a_bad_setting_is_one_sentence(script, args, sentence):
  returncode, stderr = bench(script, *args)
  assert returncode != 0
  assert sentence in stderr
  assert 'Traceback' not in stderr


@pytest.mark.parametrize('args, sentence', [
    (['epoch', '--rounds=0'], "error: --rounds='0' is not a positive whole number."),
    (['steps'], "error: 'steps' is not a part (step, epoch, seeds, steady, all), "
                "--data_path=NPZ or --rounds=N."),
    ([], 'error: no part given.'),
    (['step', 'seeds'], 'error: epoch, seeds and steady need --data_path=NPZ, the .npz of the '
     'CIFAR-10 sample'),
])
def test_accelerator_script_refuses_bad_arguments_before_running_anything(tmp_path, args,
                                                                         sentence):
  out = tmp_path / 'out'
  proc = subprocess.run(['bash', os.path.join(BENCH, 'accelerator.sh'), str(out), *args],
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2
  assert sentence in proc.stderr
  assert not out.exists()


def test_epoch_throughput_refuses_more_images_than_the_npz_has(tmp_path):
  path = tmp_path / 'small.npz'
  rng = np.random.default_rng(0)
  np.savez(path, train_images=rng.integers(0, 256, (12, 32, 32, 3), np.uint8),
           train_labels=np.arange(12) % 10, test_images=np.zeros((4, 32, 32, 3), np.uint8),
           test_labels=np.arange(4))
  returncode, stderr = bench('epoch_throughput.py', f'--data_path={path}', '--images=13',
                             '--frameworks=jax')
  assert returncode != 0
  assert f'--images=13 exceeds the 12 training images in {path}.' in stderr
  assert 'Traceback' not in stderr


def test_timing_torch_without_pytorch_installed_is_one_sentence(monkeypatch):
  import importlib.util

  from absl import app
  monkeypatch.syspath_prepend(BENCH)
  import common
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'torch' else find_spec(name, *a))
  with pytest.raises(app.UsageError, match=r"PyTorch is not installed: pip install "
                     r"'jaxprune\[bench\]', or pass --frameworks=jax\."):
    common.check_models(['vgg16'], ['jax', 'torch'])
  with pytest.raises(app.UsageError, match=r"^--torch asks for PyTorch, but PyTorch is not "
                     r"installed: .* or leave --torch out\.$"):
    common.require_torch('--torch asks for PyTorch', 'leave --torch out')
  common.check_models(['vgg16'], ['jax'])


def test_no_script_reaches_into_a_private_name_of_jaxprune():
  """The benchmarks time the library as users call it: through its public names only."""
  import ast
  found = []
  for name in sorted(os.listdir(BENCH)):
    if not name.endswith('.py'):
      continue
    tree = ast.parse(open(os.path.join(BENCH, name)).read())
    modules = set()  # local names bound to jaxprune modules
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('jaxprune'):
        found += [f'{name}: from {node.module} import {a.name}' for a in node.names
                  if a.name.startswith('_')]
        modules.update(a.asname or a.name for a in node.names)
      elif isinstance(node, ast.Import):
        modules.update((a.asname or a.name).split('.')[0] for a in node.names
                       if a.name.startswith('jaxprune'))
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and node.attr.startswith('_')
          and not node.attr.startswith('__') and isinstance(node.value, ast.Name)
          and node.value.id in modules):
        found.append(f'{name}:{node.lineno}: {node.value.id}.{node.attr}')
  assert not found, found


def jpeg_npz(path, train=8, test=4):
  """A JPEG npz in the layout r_row.py decodes: concatenated files, their offsets, labels."""
  import io

  from PIL import Image
  rng = np.random.default_rng(0)
  arrays = {}
  for split, n in (('train', train), ('test', test)):
    files = []
    for _ in range(n):
      buffer = io.BytesIO()
      Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(buffer, 'JPEG')
      files.append(buffer.getvalue())
    arrays[f'{split}_jpeg'] = np.frombuffer(b''.join(files), np.uint8)
    arrays[f'{split}_offsets'] = np.cumsum([0] + [len(f) for f in files])
    arrays[f'{split}_labels'] = rng.integers(0, 10, n)
  np.savez(path, **arrays)


def test_r_row_decodes_every_jpeg_as_pillow_reads_it(tmp_path):
  # In a subprocess: r_row.py defines absl flags on import, and other modules this pytest
  # process imports define some of the same names.
  jpeg_npz(tmp_path / 'jpeg.npz')
  code = ('import json, sys; sys.path.insert(0, sys.argv[1]); import r_row; '
          'print(json.dumps(r_row.decode(sys.argv[2], sys.argv[3])))')
  proc = subprocess.run([sys.executable, '-c', code, BENCH, str(tmp_path / 'jpeg.npz'),
                         str(tmp_path / 'out.npz')], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  shapes = json.loads(proc.stdout)
  assert shapes == {'train_images': [8, 32, 32, 3], 'train_labels': [8],
                    'test_images': [4, 32, 32, 3], 'test_labels': [4]}
  decoded = np.load(tmp_path / 'out.npz')
  assert decoded['train_images'].dtype == np.uint8 and decoded['test_labels'].dtype == np.int32


def test_r_row_dry_run_prints_the_full_scale_plan():
  proc = subprocess.run([sys.executable, os.path.join(BENCH, 'r_row.py'), '--dry_run'],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  assert [line.split(':')[0] for line in lines[1:4]] == ['finetune', 'scratch', 'scratch_b']
  assert all('--epochs=160 --batch_size=64' in line and '--preset=vgg16_a' in line
             and '--finetune_epochs=40 --finetune_lr=0.001' in line and '--seeds=5' in line
             for line in lines[1:4])
  assert 'baseline 160 epochs, finetune 40, scratch-E 160' in lines[4]


@pytest.mark.slow
def test_r_row_runs_end_to_end_at_tiny_settings(tmp_path):
  """The whole script on the CPU: 64 images, one epoch per stage, two vmapped seeds."""
  jpeg_npz(tmp_path / 'jpeg.npz', train=64, test=32)
  proc = subprocess.run(
      [sys.executable, os.path.join(BENCH, 'r_row.py'), f'--jpeg_npz={tmp_path / "jpeg.npz"}',
       f'--out={tmp_path / "out"}', '--epochs=1', '--finetune_epochs=1', '--batch_size=32',
       '--seeds=2', '--budget_s=1500'], capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  table = (tmp_path / 'out' / 'table.txt').read_text().splitlines()
  assert [line.split()[:2] for line in table[1:]] == [
      ['unpruned', '2'], ['fine-tuned', '2'], ['scratch-E', '2'], ['scratch-B', '2']]
  assert all((tmp_path / 'out' / 'logs' / f'{regime}.log').exists()
             for regime in ('finetune', 'scratch', 'scratch_b'))
