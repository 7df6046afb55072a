"""Streaming input (`jaxprune.stream`): ImageNet through the whole pipeline (TFDS's mock
data), an array_record dataset of JPEGs written here through grain, exact resumption after
kill -9 and exact sharding over two processes."""

import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxprune import data, local_cluster, pipeline, stream
from jaxprune.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAME = 'stream_test_jpegs'
TRAIN, TEST, CLASSES = 160, 40, 10


def _jpeg(image: np.ndarray) -> io.BytesIO:
  from PIL import Image
  out = io.BytesIO()
  Image.fromarray(image).save(out, format='JPEG', quality=90)
  out.seek(0)
  return out


class StreamTestJpegs(tfds.core.GeneratorBasedBuilder):
  """JPEGs of varying size (48-80 pixels a side), each class its own colour plus noise."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
        'label': tfds.features.ClassLabel(num_classes=CLASSES)}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(TRAIN, 0),
            'test': self._generate_examples(TEST, 1)}

  def _generate_examples(self, count, seed):
    rng = np.random.default_rng(seed)
    for i in range(count):
      label = i % CLASSES
      h, w = rng.integers(48, 81, size=2)
      colour = np.array([25 * label, 255 - 25 * label, 128], np.float64)
      image = np.clip(colour + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
      yield i, {'image': _jpeg(image), 'label': label}


@pytest.fixture(scope='module')
def jpeg_dir(tmp_path_factory) -> pathlib.Path:
  """A TFDS data_dir holding stream_test_jpegs as array_record (written without TensorFlow)."""
  root = tmp_path_factory.mktemp('tfds')
  StreamTestJpegs(data_dir=str(root), file_format='array_record').download_and_prepare()
  return root


def test_tfds_jpegs_stream_with_random_resized_crops_and_centre_crops(jpeg_dir):
  s = stream.open_stream(f'tfds:{NAME}', data_dir=jpeg_dir, image_size=32)
  assert (s.num_train, s.num_test, s.num_classes, s.image_shape) == (TRAIN, TEST, CLASSES,
                                                                    (32, 32, 3))
  assert not s.augment.fixed_shape and s.spec.crop_padding == 0
  batches = list(stream.train_iterator(s, seed=0, batch_size=16, epochs=2))
  assert len(batches) == 2 * (TRAIN // 16)
  assert batches[0]['image'].shape == (16, 32, 32, 3) and batches[0]['image'].dtype == np.uint8
  # Every epoch reads every example once, in a new order.
  first = np.concatenate([b['label'] for b in batches[:10]])
  second = np.concatenate([b['label'] for b in batches[10:]])
  assert np.bincount(first).tolist() == np.bincount(second).tolist() == [16] * CLASSES
  assert first.tolist() != second.tolist()
  test = list(stream.test_batches(s, 16))
  assert [b['valid'].sum() for b in test] == [16, 16, 8]
  labels = np.concatenate([b['label'][b['valid']] for b in test])
  assert labels.tolist() == [int(s.test[i]['label']) for i in range(TEST)]


def test_a_stream_is_the_same_for_the_same_seed_and_another_for_another(jpeg_dir):
  s = stream.open_stream(f'tfds:{NAME}', data_dir=jpeg_dir, image_size=32)
  one, again, other = (next(stream.train_iterator(s, seed=seed, batch_size=16, epochs=1))
                       for seed in (0, 0, 1))
  assert np.array_equal(one['image'], again['image'])
  assert not np.array_equal(one['image'], other['image'])


def test_train_positions_of_processes_split_every_global_batch():
  source = stream.ArraySource(np.zeros((50, 1, 1, 1), np.uint8), np.arange(50))
  shards = [stream._TrainPositions(source, 12, 6, process, seed=3, epochs=2)
            for process in range(2)]
  steps = 50 // 12
  for epoch in range(2):
    read = [[int(shard[k][1]['label']) for k in range(epoch * steps * 6, (epoch + 1) * steps * 6)]
            for shard in shards]
    assert not set(read[0]) & set(read[1])
    assert sorted(read[0] + read[1]) == sorted(shards[0].order(epoch)[:steps * 12].tolist())
    assert len(set(read[0] + read[1])) == steps * 12


_SHARDS = """
import json, sys
from jaxprune import multihost, stream
port, index, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
multihost.initialize(f'localhost:{port}', 2, index, timeout_s=60)
s = stream.open_stream('npz', data_path=path)
print(json.dumps([[b['label'].tolist(), b['image'].reshape(len(b['image']), -1).tolist()]
                  for b in stream.train_iterator(s, seed=5, batch_size=8, epochs=2)]))
"""


def test_two_processes_read_their_own_halves_of_one_process_batches(tmp_path):
  n = 44
  path = tmp_path / 'ids.npz'
  images = np.random.default_rng(0).integers(0, 256, (n, 6, 6, 3), dtype=np.uint8)
  np.savez(path, train_images=images, train_labels=np.arange(n),
           test_images=images[:4], test_labels=np.arange(4))
  port = local_cluster.free_port()
  procs = [subprocess.Popen([sys.executable, '-c', _SHARDS, str(port), str(i), str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=local_cluster.environment(1)) for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  for proc, (_, err) in zip(procs, outputs):
    assert proc.returncode == 0, err[-3000:]
  read_by = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
  halves = [[labels for labels, _ in batches] for batches in read_by]
  steps = n // 8
  # Put together, the halves are the batches one process reads, augmentation included.
  whole = list(stream.train_iterator(stream.open_stream('npz', data_path=path), seed=5,
                                     batch_size=8, epochs=2))
  for i, batch in enumerate(whole):
    assert batch['label'].tolist() == read_by[0][i][0] + read_by[1][i][0]
    assert batch['image'].reshape(8, -1).tolist() == read_by[0][i][1] + read_by[1][i][1]
  assert [len(h) for h in halves] == [2 * steps] * 2
  for epoch in range(2):
    read = [sum(h[epoch * steps:(epoch + 1) * steps], []) for h in halves]
    assert all(len(b) == 4 for h in halves for b in h)
    # Together the processes read each example of the epoch once; 44 % 8 examples are left.
    assert not set(read[0]) & set(read[1])
    assert len(set(read[0]) | set(read[1])) == steps * 8


_KILLED = """
import json, os, signal, sys
import numpy as np
from jaxprune import stream
if __name__ == '__main__':
  mode, data_dir, out = sys.argv[1:]
  s = stream.open_stream('tfds:{name}', data_dir=data_dir, image_size=24, workers=2)
  batches = stream.train_iterator(s, seed=7, batch_size=16, epochs=2)
  if mode == 'resume':
    batches.set_state(json.load(open(out + '.state')))
    np.save(out + '.resumed.npy', np.stack([next(batches)['image'] for _ in range(3)]))
  else:
    seen = []
    for step in range(14):
      seen.append(next(batches)['image'])
      if step == 8:
        with open(out + '.state', 'w') as f:
          json.dump(batches.get_state(), f)
      if mode == 'killed' and step == 10:
        os.kill(os.getpid(), signal.SIGKILL)
    np.save(out + '.straight.npy', np.stack(seen[9:12]))
"""


def test_a_stream_killed_mid_epoch_resumes_at_the_next_batch_bit_for_bit(jpeg_dir, tmp_path):
  script = tmp_path / 'killed.py'
  script.write_text(_KILLED.format(name=NAME))
  out = str(tmp_path / 'run')

  def run(mode):
    # Its own session: grain's worker processes outlive a killed parent, so they go with it.
    with open(f'{out}.{mode}.log', 'w+') as log:
      proc = subprocess.Popen([sys.executable, str(script), mode, str(jpeg_dir), out],
                              stdout=log, stderr=log, cwd=ROOT, start_new_session=True)
      try:
        proc.wait(timeout=300)
      finally:
        try:
          os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
      log.seek(0)
      return subprocess.CompletedProcess(proc.args, proc.returncode, '', log.read())

  straight = run('straight')
  assert straight.returncode == 0, straight.stderr[-3000:]
  killed = run('killed')
  assert killed.returncode == -signal.SIGKILL
  resumed = run('resume')
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  # Step 9 is the eleventh batch of the first epoch (10 steps): the state crosses an epoch.
  assert np.array_equal(np.load(out + '.resumed.npy'), np.load(out + '.straight.npy'))


_FIT = """
import os, signal, sys, time
import jax, numpy as np
from absl import logging
from jaxprune import models, stream, train
logging.set_verbosity(logging.INFO)
stage, kill_at, saved = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = stream.open_stream('digits')
model = models.build('tiny', num_classes=10)
init = models.init(model, jax.random.key(0), s.image_shape)

def hook(state, batch, masks, hook_state):
  if int(state.step) == kill_at:
    # Killed once the first epoch's checkpoint is written, in the middle of the second.
    while not os.path.exists(os.path.join(stage, 'checkpoints', saved)):
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)
  return masks, hook_state

options = train.TrainOptions(epochs=2, batch_size=64, optimizer=train.OptimizerConfig(learning_rate=0.05))
variables, summary = train.fit(model, init, s, s.spec, options, stage_dir=stage, seed=1,
                               step_hook=hook)
np.save(stage + '.npy', np.concatenate([np.ravel(x) for x in jax.tree.leaves(variables)]))
"""


def test_training_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path):
  script = tmp_path / 'fit.py'
  script.write_text(_FIT)

  per_epoch = 1437 // 64

  def fit(stage, kill_at):
    return subprocess.run([sys.executable, str(script), str(tmp_path / stage), str(kill_at),
                           str(per_epoch)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)

  straight = fit('straight', -1)
  assert straight.returncode == 0, straight.stderr[-3000:]
  killed = fit('killed', per_epoch + 15)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  resumed = fit('killed', -1)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'from step {per_epoch}.' in resumed.stderr
  assert np.array_equal(np.load(tmp_path / 'killed.npy'), np.load(tmp_path / 'straight.npy'))


def test_mock_imagenet_runs_baseline_prune_and_a_regime(tmp_path):
  with tfds.testing.mock_data(num_examples=48):
    config = pipeline.config.make(
        dataset='imagenet2012', model='resnet18', width_multiplier=0.125, image_size=32,
        epochs=1, batch_size=16, criterion='l1', prune_ratio=0.5, regime='finetune',
        finetune_epochs=1, input_workers=0, workdir=str(tmp_path / 'run'))
    results = pipeline.run(config)
  rows = {row['stage']: row for row in results['rows']}
  assert set(rows) == {'baseline', 'pruned', 'finetune'}
  assert rows['pruned']['macs'] < rows['baseline']['macs']
  assert rows['finetune']['epochs'] == 1
  baseline = json.loads((tmp_path / 'run' / 'baseline' / 'stage_config.json').read_text())
  assert (baseline['dataset'], baseline['input'], baseline['image_size']) == (
      'imagenet2012', 'auto', 32)
  metrics = (tmp_path / 'run' / 'baseline' / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(line)['step'] for line in metrics] == [48 // 16]


def test_a_streamed_run_of_digits_learns_and_vmapped_seeds_are_refused(tmp_path):
  values = dict(dataset='digits', input='stream', model='tiny', epochs=3, batch_size=32,
                criterion='l1', regime='finetune', finetune_epochs=1, input_workers=0, workdir=str(tmp_path / 'run'))
  results = pipeline.run(pipeline.config.make(**values))
  baseline = next(r for r in results['rows'] if r['stage'] == 'baseline')
  assert baseline['test_accuracy'] > 0.3
  with pytest.raises(ConfigError, match='seed_batching=vmap trains the copies from a dataset '
                                        'held on the devices, but this one streams'):
    pipeline.run(pipeline.config.make(**values, seeds=2, seed_batching='vmap'))


def test_imagenet_on_the_device_path_and_unknown_tfds_names_are_one_sentence(tmp_path,
                                                                             jpeg_dir):
  with pytest.raises(ConfigError, match='dataset=imagenet2012 does not fit on a device'):
    data.load('imagenet2012', data_dir=str(tmp_path))
  with pytest.raises(ConfigError, match=rf'dataset=tfds:{NAME} has images of varying size '
                                        r'\(None, None, 3\), which cannot be held'):
    data.load(f'tfds:{NAME}', data_dir=str(jpeg_dir))
  with pytest.raises(ConfigError, match="TFDS has no dataset 'no_such_set'"):
    stream.open_stream('tfds:no_such_set', data_dir=str(tmp_path))


STREAMED = ('--dataset=digits', '--input=stream', '--input_workers=1', '--model=tiny',
            '--epochs=4', '--batch_size=32', '--criterion=taylor', '--regime=scratch',
            '--compilation_cache_dir=', '--multihost_timeout=60')


@pytest.mark.slow
def test_two_processes_preempted_mid_epoch_resume_to_one_process_result(tmp_path):
  import time
  two, logs = tmp_path / 'two', tmp_path / 'logs'
  command = [sys.executable, '-m', 'jaxprune.local_cluster', '--processes=2',
             '--devices_per_process=1', f'--log_dir={logs}', '--', f'--workdir={two}',
             *STREAMED]
  proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=ROOT)
  metrics = two / 'baseline' / 'metrics.jsonl'
  deadline = time.time() + 600
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 75, err[-3000:]
  step = int(err.split('preempted: step ')[1].split()[0])
  assert step % (1437 // 32)  # mid-epoch, so the readers' positions matter
  resumed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'from step {step}.' in resumed.stderr
  one = subprocess.run([sys.executable, str(ROOT / 'launch.py'), f'--workdir={tmp_path / "one"}',
                        *STREAMED], capture_output=True, text=True, cwd=ROOT, timeout=900,
                       env=local_cluster.environment(1))
  assert one.returncode == 0, one.stderr[-3000:]
  rows = [json.loads((w / 'results.json').read_text())['rows'] for w in (two, tmp_path / 'one')]
  assert [(r['stage'], r['test_accuracy']) for r in rows[0]] == [
      (r['stage'], r['test_accuracy']) for r in rows[1]]
