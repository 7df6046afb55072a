"""The benchmark scripts answer a bad setting with one sentence, not a traceback, time the
library through its public names, and run end to end at tiny settings; the GPU row script
(experiments/gpu_row.py) decodes its data and plans [R]'s row."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           'experiments')
BENCH = os.path.join(EXPERIMENTS, 'bench')
GPU_ROW = os.path.join(EXPERIMENTS, 'gpu_row.py')


def bench(script, *args):
  proc = subprocess.run([sys.executable, os.path.join(BENCH, script), *args],
                        capture_output=True, text=True, timeout=300)
  return proc.returncode, proc.stderr


@pytest.mark.parametrize('script, args, sentence', [
    ('latency.py', ['--models=foo'], "error: unknown model 'foo'; choose one of:"),
    ('latency.py', ['--vgg_targets=0.5,abc'],
     '--vgg_targets entries are fractions of the MACs in (0, 1], e.g. 0.5,0.25.'),
    ('latency.py', ['--round_to=0'], '--round_to entries are whole numbers >= 1, e.g. 1,8.'),
    ('throughput.py', ['--steps=0'], 'flag --steps=0: 0 is not a positive integer'),
    ('throughput.py', ['--frameworks=jax', '--jax_variants=auto/fast'],
     "--jax_variants entry 'auto/fast' is not CONV_IMPL/XLA_OPTIONS[/BATCH_NORM]"),
    ('criteria_cost.py', ['--criteria=l1,bogus'], "--criteria ['bogus'] are not criteria; "
     'choose from random,'),
    # The sample npz has no default place on a machine: the scripts that read it ask for it.
    ('epoch_throughput.py', ['--frameworks=jax'],
     '--data_path is required: the .npz of the CIFAR-10 sample'),
    ('steady_state.py', [], '--data_path is required: the .npz of the CIFAR-10 sample'),
    # A worker process's one sentence (jaxprune's, for a file it cannot read) is passed on.
    ('steady_state.py', ['--data_path=/nope.npz', '--models=tiny'],
     "error: npz file '/nope.npz' does not exist."),
    ('epoch_throughput.py', ['--loader_workers=0,-1'],
     '--loader_workers entries are whole numbers >= 0.'),
    ('input_throughput.py', ['--workers=-1'],
     '--workers entries are whole numbers >= 0, e.g. 0,1,2.'),
    ('input_throughput.py', ['--device_images_per_second=3000,fast'],
     '--device_images_per_second entries are images/s above 0, e.g. 3000,12000.'),
    # Refused before any JPEG is written: the first round of 2 x 2 batches is not timed.
    ('input_throughput.py', ['--records=256', '--batch=64'],
     '--records=256 makes 4 batches of --batch=64, none left to time after the first round '
     'of 4 (2 per process); give --records=320 or more.'),
])
def test_a_bad_setting_is_one_sentence(script, args, sentence):
  returncode, stderr = bench(script, *args)
  assert returncode != 0
  assert sentence in stderr
  assert 'Traceback' not in stderr


@pytest.mark.parametrize('args, sentence', [
    (['epoch', '--rounds=0'], "error: --rounds='0' is not a positive whole number."),
    (['steps'], "error: 'steps' is not a part (step, epoch, steady, all), "
                "--data_path=NPZ or --rounds=N."),
    ([], 'error: no part given.'),
    (['step', 'epoch'], 'error: epoch and steady need --data_path=NPZ, the .npz of the '
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
  scripts = [os.path.join(BENCH, n) for n in sorted(os.listdir(BENCH)) if n.endswith('.py')]
  for path in scripts + [GPU_ROW]:
    name = os.path.basename(path)
    tree = ast.parse(open(path).read())
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


def sample_npz(path, train=64, test=16):
  """A CIFAR-shaped npz in the sample's layout."""
  rng = np.random.default_rng(0)
  np.savez(path, train_images=rng.integers(0, 256, (train, 32, 32, 3), np.uint8),
           train_labels=np.arange(train) % 10,
           test_images=rng.integers(0, 256, (test, 32, 32, 3), np.uint8),
           test_labels=np.arange(test) % 10)
  return path


# Every benchmark at tiny settings, jax only (PyTorch is a bench-only extra): the table it
# writes has a row for each measurement asked for.
SMOKE = [
    ('latency.py', ['--models=tiny', '--resnet_targets=0.5', '--round_to=1,8', '--batch=4',
                    '--reps=1'], lambda out: len(out['rows']) == 3),
    pytest.param('criteria_cost.py', ['--model=tiny', '--image_size=8', '--batch=4', '--reps=1',
                                      '--criteria=l1,taylor,oracle', '--oracle_models=tiny',
                                      '--oracle_image_size=8', '--oracle_batch=2'],
                 lambda out: ([r['criterion'] for r in out['criteria']['rows']]
                              == ['train_step', 'l1', 'taylor', 'oracle']
                              and len(out['oracle'][0]['methods']) == 3),
                 marks=pytest.mark.slow),
    pytest.param('throughput.py', ['--models=tiny', '--frameworks=jax',
                                   '--jax_variants=auto/jaxprune', '--rounds=1', '--batch=8',
                                   '--steps=2', '--warmup=0'],
                 lambda out: [r['config'] for r in out['rows']] == [
                     'jax auto/jaxprune/jaxprune float32'], marks=pytest.mark.slow),
    pytest.param('epoch_throughput.py', ['--models=tiny', '--frameworks=jax', '--images=32',
                                         '--batch=8', '--epochs=2', '--rounds=1', 'NPZ'],
                 lambda out: out['rows'][0]['images_per_s'] > 0, marks=pytest.mark.slow),
    pytest.param('epoch_overhead.py', ['--model=tiny', '--batch_size=8', '--steps_per_epoch=3',
                                       '--test_size=16', '--epochs=2', '--reps=2'],
                 lambda out: [r['epoch'] for r in out['rows']] == [1, 2],
                 marks=pytest.mark.slow),
    pytest.param('steady_state.py', ['--models=tiny', '--batches=8', '--copies=1,2',
                                     '--steps=2', '--repeats=1', 'NPZ'],
                 lambda out: [(r['copies'], r['mode']) for r in out['rows']] == [
                     (1, 'calls'), (1, 'steps'), (2, 'calls'), (2, 'steps')],
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize('script, args, check', SMOKE)
def test_script_runs_at_tiny_settings_and_writes_its_table(tmp_path, script, args, check):
  data_path = f'--data_path={sample_npz(tmp_path / "sample.npz")}'
  args = [data_path if a == 'NPZ' else a for a in args]
  returncode, stderr = bench(script, *args, f'--out={tmp_path / "out.json"}')
  assert returncode == 0, stderr[-3000:]
  out = json.loads((tmp_path / 'out.json').read_text())
  assert out['machine']['backend'] == 'cpu'
  assert check(out), out


def jpeg_npz(path, train=8, test=4):
  """A JPEG npz in the layout gpu_row.py decodes: concatenated files, their offsets, labels."""
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


def test_gpu_row_decodes_every_jpeg_as_pillow_reads_it(tmp_path):
  # In a subprocess: gpu_row.py defines absl flags on import, and other modules this pytest
  # process imports define some of the same names.
  jpeg_npz(tmp_path / 'jpeg.npz')
  code = ('import json, sys; sys.path.insert(0, sys.argv[1]); import gpu_row; '
          'print(json.dumps(gpu_row.decode(sys.argv[2], sys.argv[3])))')
  proc = subprocess.run([sys.executable, '-c', code, EXPERIMENTS, str(tmp_path / 'jpeg.npz'),
                         str(tmp_path / 'out.npz')], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  shapes = json.loads(proc.stdout)
  assert shapes == {'train_images': [8, 32, 32, 3], 'train_labels': [8],
                    'test_images': [4, 32, 32, 3], 'test_labels': [4]}
  decoded = np.load(tmp_path / 'out.npz')
  assert decoded['train_images'].dtype == np.uint8 and decoded['test_labels'].dtype == np.int32


def test_gpu_row_dry_run_prints_the_full_scale_plan():
  proc = subprocess.run([sys.executable, GPU_ROW, '--dry_run'],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  assert [line.split(':')[0] for line in lines[1:4]] == ['finetune', 'scratch', 'scratch_b']
  assert all('--epochs=160 --batch_size=64' in line and '--preset=vgg16_a' in line
             and '--finetune_epochs=40 --finetune_lr=0.001' in line and '--seeds=5' in line
             for line in lines[1:4])
  assert 'baseline 160 epochs, finetune 40, scratch-E 160' in lines[4]


@pytest.mark.slow
def test_gpu_row_runs_end_to_end_at_tiny_settings(tmp_path):
  """The whole script on the CPU: 64 images, one epoch per stage, two vmapped seeds."""
  jpeg_npz(tmp_path / 'jpeg.npz', train=64, test=32)
  proc = subprocess.run(
      [sys.executable, GPU_ROW, f'--jpeg_npz={tmp_path / "jpeg.npz"}',
       f'--out={tmp_path / "out"}', '--epochs=1', '--finetune_epochs=1', '--batch_size=32',
       '--seeds=2', '--budget_s=1500'], capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  table = (tmp_path / 'out' / 'table.txt').read_text().splitlines()
  assert [line.split()[:2] for line in table[1:]] == [
      ['unpruned', '2'], ['fine-tuned', '2'], ['scratch-E', '2'], ['scratch-B', '2']]
  assert all((tmp_path / 'out' / 'logs' / f'{regime}.log').exists()
             for regime in ('finetune', 'scratch', 'scratch_b'))


def test_input_throughput_times_both_transforms_and_sizes_the_host_for_a_device(tmp_path):
  """JPEGs written to --data_dir, read back by the stream with 0 and 1 workers: every row
  times the pass after the first round, the table prints, the host cores follow from the
  train rate of the most workers; a second run reuses the data_dir or refuses another size."""
  script = os.path.join(BENCH, 'input_throughput.py')
  data_dir, out = tmp_path / 'tfds', tmp_path / 'out.json'
  args = ['--images=8', '--batch=8', '--image_size=32', f'--data_dir={data_dir}']
  proc = subprocess.run([sys.executable, script, *args, '--records=64', '--workers=0,1',
                         '--device_images_per_second=1000,2500.5', f'--out={out}'],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  rows = result['rows']
  # 8 batches a pass; the first round is 2 batches per process.
  assert [(r['workers'], r['transform'], r['images']) for r in rows] == [
      (0, 'train', 48), (0, 'test', 48), (1, 'train', 48), (1, 'test', 48)]
  assert all(r['images_per_s'] > 0 and r['cpu_s'] > 0 for r in rows)
  assert all(r['images_per_s_per_core'] == r['images_per_s'] for r in rows)  # one core each
  per_core = rows[2]['images_per_cpu_s']
  assert result['per_core_train_images_per_cpu_s'] == per_core
  assert result['feeds'] == [
      {'device_images_per_s': 1000.0, 'host_cores': int(np.ceil(1000 / per_core))},
      {'device_images_per_s': 2500.5, 'host_cores': int(np.ceil(2500.5 / per_core))}]
  assert 60 < result['jpeg_kb'] < 140  # ImageNet-like photos, not flat colour
  lines = proc.stdout.splitlines()
  header = lines.index(next(line for line in lines if line.startswith('workers  transform')))
  assert [line.split()[:3] for line in lines[header + 2:header + 6]] == [
      ['0', 'train', '48'], ['0', 'test', '48'], ['1', 'train', '48'], ['1', 'test', '48']]
  assert 'device_images_per_s  host_cores' in proc.stdout
  assert 'wrote 8 JPEGs' in proc.stdout

  again = subprocess.run([sys.executable, script, *args, '--records=64', '--workers=0'],
                         capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'wrote 8 JPEGs' not in again.stdout
  other = subprocess.run([sys.executable, script, *args, '--records=128', '--workers=0'],
                         capture_output=True, text=True, timeout=300)
  assert other.returncode != 0 and 'Traceback' not in other.stderr
  assert (f'--data_dir {data_dir} holds input_throughput_jpegs with 64 records per split, not '
          '--records=128; give --records=64 or another --data_dir.') in other.stderr
