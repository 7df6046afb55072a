r"""[R]'s VGG-16-A row (L1-norm preset) at full budget on one accelerator, within a time limit.

    python experiments/gpu_row.py --jpeg_npz=JPEG_NPZ --out=OUT  # <= --budget_s
    python experiments/gpu_row.py --dry_run                       # the plan only

1. Decodes the JPEG CIFAR-10 (--jpeg_npz: keys {train,test}_jpeg, the images' JPEG files
   concatenated, {train,test}_offsets, their start offsets and the end, {train,test}_labels)
   into OUT/cifar10.npz, the uint8 arrays `--dataset=npz` reads.
2. Runs `launch.py` once per regime, in [R]'s order (finetune, scratch, scratch_b), all in
   one work directory OUT/work, so the first run trains the baseline (160 epochs, batch 64,
   lr 0.1, [R]'s VGG code: BN gammas at 0.5, the Dense layers at N(0, 0.01)) and prunes it
   (l1, preset vgg16_a) and the later ones reuse both. --seeds copies train vmapped
   (`--seed_batching=vmap`). Each run's output goes to OUT/logs/REGIME.log as it is written.
3. At --budget_s (wall seconds from the start) the running launch.py gets SIGTERM: it saves
   at its next call boundary and exits; what finished is kept, and a rerun with the same
   OUT resumes. The table (also OUT/table.txt) holds every stage that finished: the mean
   and std over seeds of the final test accuracy, beside [R]'s published row.
"""

import glob
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_string('jpeg_npz', None, 'The JPEG CIFAR-10 npz (module docstring).')
flags.DEFINE_string('out', None, 'Output directory: the decoded npz, logs, work directory.')
flags.DEFINE_float('budget_s', 540, 'Wall seconds for everything; the run then stops.')
flags.DEFINE_integer('seeds', 5, 'Seeds, trained as vmapped copies.', lower_bound=1)
flags.DEFINE_integer('epochs', 160, 'Baseline and scratch-E epochs.', lower_bound=1)
flags.DEFINE_integer('finetune_epochs', 40, 'Fine-tuning epochs.', lower_bound=1)
flags.DEFINE_integer('batch_size', 64, 'Batch size.', lower_bound=1)
flags.DEFINE_integer('max_train', None, 'Train on this many images (tests: tiny settings).')
flags.DEFINE_string('model', 'vgg16_mlp', "Model ([R]'s L1-norm VGG-16).")
flags.DEFINE_list('extra_flags', [], 'More launch.py flags (e.g. --steps_per_call=100).')
flags.DEFINE_bool('dry_run', False, 'Print the plan (commands, epochs) and exit.')

REGIMES = ('finetune', 'scratch', 'scratch_b')
# [R] Table 1 (L1-norm filter pruning, CIFAR-10, VGG-16 -> VGG-16-A): mean and std over 5 runs,
# transcribed from the paper (REFERENCES.md does not list them): check them there before citing.
R_ROW = {'baseline': (93.63, 0.16), 'finetune': (93.41, 0.12), 'scratch': (93.62, 0.11),
         'scratch_b': (93.78, 0.15)}
STAGE_NAMES = {'baseline': 'unpruned', 'finetune': 'fine-tuned', 'scratch': 'scratch-E',
               'scratch_b': 'scratch-B'}
# After SIGTERM launch.py saves at its next call boundary; past this it is killed.
GRACE_S = 60


def decode(jpeg_npz: str, out_npz: str) -> dict:
  """Decodes every JPEG of `jpeg_npz` (Pillow) into `out_npz`; returns the arrays' shapes."""
  from PIL import Image
  source = np.load(jpeg_npz)
  arrays = {}
  for split in ('train', 'test'):
    blob = source[f'{split}_jpeg'].tobytes()
    offsets = source[f'{split}_offsets']
    arrays[f'{split}_images'] = np.stack([
        np.asarray(Image.open(io.BytesIO(blob[start:end])).convert('RGB'), np.uint8)
        for start, end in zip(offsets[:-1], offsets[1:])])
    arrays[f'{split}_labels'] = np.asarray(source[f'{split}_labels'], np.int32)
  np.savez(out_npz, **arrays)
  return {name: list(value.shape) for name, value in arrays.items()}


def launch_flags(out: str, regime: str) -> list[str]:
  """launch.py's flags for one regime of the row, everything under `out`."""
  chosen = [f'--model={FLAGS.model}', '--bn_scale_init=0.5', '--dense_init=normal_0.01',
            '--dataset=npz', f'--data_path={os.path.join(out, "cifar10.npz")}',
            f'--epochs={FLAGS.epochs}',
            f'--batch_size={FLAGS.batch_size}', '--lr=0.1', '--criterion=l1',
            '--selection=preset', '--preset=vgg16_a',
            f'--finetune_epochs={FLAGS.finetune_epochs}', '--finetune_lr=0.001',
            f'--regime={regime}', f'--seeds={FLAGS.seeds}', '--seed_batching=vmap',
            f'--workdir={os.path.join(out, "work")}',
            f'--compilation_cache_dir={os.path.join(out, "cache")}']
  if FLAGS.max_train:
    chosen.append(f'--max_train={FLAGS.max_train}')
  return chosen + list(FLAGS.extra_flags)


def run_until(command: list[str], log_path: str, deadline: float) -> str:
  """Runs `command` with its output in `log_path`; SIGTERM at `deadline`. Returns how it ended."""
  with open(log_path, 'w') as log:
    proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    try:
      proc.wait(timeout=max(1.0, deadline - time.time()))
      return f'exit {proc.returncode}'
    except subprocess.TimeoutExpired:
      proc.send_signal(signal.SIGTERM)
      try:
        proc.wait(timeout=GRACE_S)
        return f'stopped at the budget (exit {proc.returncode})'
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return 'killed at the budget'


def finished_accuracies(work: str) -> dict[str, list[float]]:
  """{stage: [final test accuracy of each seed that finished it]} from the result.json files."""
  found = {stage: [] for stage in STAGE_NAMES}
  for path in sorted(glob.glob(os.path.join(work, '**', 'result.json'), recursive=True)):
    stage = os.path.basename(os.path.dirname(path))
    if stage in found:
      with open(path) as f:
        found[stage].append(100 * json.load(f)['test_accuracy'])
  return found


def table(found: dict[str, list[float]]) -> str:
  lines = [f'{"stage":<11} {"seeds":>5} {"jaxprune":>15} {"[R]":>14}']
  for stage, name in STAGE_NAMES.items():
    values = found[stage]
    ours = (f'{np.mean(values):6.2f} ± {np.std(values):4.2f}' if values else 'not run')
    mean, std = R_ROW[stage]
    lines.append(f'{name:<11} {len(values):>5} {ours:>15} {mean:8.2f} ± {std:4.2f}')
  return '\n'.join(lines)


def main(argv):
  del argv
  if FLAGS.dry_run:
    out = FLAGS.out or 'OUT'
    print(f'decode {FLAGS.jpeg_npz or "JPEG_NPZ"} -> {out}/cifar10.npz', flush=True)
    for regime in REGIMES:
      command = ['python', 'launch.py'] + launch_flags(out, regime)
      print(f'{regime}: ' + ' '.join(command) + f'  > {out}/logs/{regime}.log')
    print(f'baseline {FLAGS.epochs} epochs, finetune {FLAGS.finetune_epochs}, scratch-E '
          f'{FLAGS.epochs}, scratch-B {FLAGS.epochs} x the MACs ratio of vgg16_a; '
          f'{FLAGS.seeds} seeds vmapped; SIGTERM at {FLAGS.budget_s:g} s.')
    return
  if not FLAGS.jpeg_npz or not FLAGS.out:
    raise app.UsageError('--jpeg_npz and --out are required (or --dry_run).')
  deadline = time.time() + FLAGS.budget_s
  os.makedirs(os.path.join(FLAGS.out, 'logs'), exist_ok=True)
  data_path = os.path.join(FLAGS.out, 'cifar10.npz')
  if not os.path.exists(data_path):
    started = time.time()
    shapes = decode(FLAGS.jpeg_npz, data_path)
    print(f'decoded {shapes} in {time.time() - started:.0f} s', flush=True)
  work = os.path.join(FLAGS.out, 'work')
  for regime in REGIMES:
    if time.time() >= deadline:
      print(f'{regime}: not started (budget spent)', flush=True)
      continue
    started = time.time()
    ended = run_until([sys.executable, 'launch.py'] + launch_flags(FLAGS.out, regime),
                      os.path.join(FLAGS.out, 'logs', f'{regime}.log'), deadline)
    print(f'{regime}: {ended} after {time.time() - started:.0f} s', flush=True)
  text = table(finished_accuracies(work))
  with open(os.path.join(FLAGS.out, 'table.txt'), 'w') as f:
    f.write(text + '\n')
  print(text)


if __name__ == '__main__':
  app.run(main)
