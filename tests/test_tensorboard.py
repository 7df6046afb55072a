"""TensorBoard: every stage's epochs are in its tensorboard/ event files, resumed or vmapped."""

import struct

import pytest
from tensorboardX.proto import event_pb2

from jaxprune import data, train
from jaxprune.train import checkpoint
from test_train import learnable_dataset, tiny, two_copies

OPTIONS = train.TrainOptions(epochs=2, batch_size=64,  # 4 steps per epoch.
                             optimizer=train.OptimizerConfig(learning_rate=0.05))
TAGS = {'train/loss': 'train_loss', 'train/accuracy': 'train_accuracy',
        'test/loss': 'test_loss', 'test/accuracy': 'test_accuracy',
        'learning_rate': 'learning_rate'}


def read_events(stage):
  """Every event of the stage's event files.

  A TFRecord is uint64 length, uint32 CRC of the length, the data, uint32 CRC of the data.
  """
  events = []
  for path in (stage / checkpoint.TENSORBOARD).glob('events.out.tfevents.*'):
    records, offset = path.read_bytes(), 0
    while offset < len(records):
      (length,) = struct.unpack_from('<Q', records, offset)
      events.append(event_pb2.Event.FromString(records[offset + 12:offset + 12 + length]))
      offset += 12 + length + 4
  return events


def scalars(stage) -> dict:
  """{tag: [(step, value)]} of the stage's scalar summaries, by step."""
  points = {}
  for event in read_events(stage):
    for value in event.summary.value:
      points.setdefault(value.tag, []).append((event.step, value.simple_value))
  return {tag: sorted(values) for tag, values in points.items()}


def assert_events_are_the_metrics(stage):
  records = checkpoint.read_metrics(stage)
  points = scalars(stage)
  assert set(points) == set(TAGS)
  for tag, name in TAGS.items():
    assert [step for step, _ in points[tag]] == [4, 8], tag
    assert [value for _, value in points[tag]] == pytest.approx([r[name] for r in records]), tag


def fit(stage, callbacks=()):
  ds = learnable_dataset()
  model, _, variables = tiny()
  return train.fit(model, variables, data.device_put_dataset(ds), ds.spec, OPTIONS,
                   stage_dir=stage, callbacks=callbacks)


def test_fit_writes_each_epochs_scalars_at_its_optimizer_step(tmp_path):
  fit(tmp_path)
  assert_events_are_the_metrics(tmp_path)


class Crash(Exception):
  pass


def test_a_resumed_fit_adds_the_epochs_it_trains(tmp_path):
  def crash(state, record):
    raise Crash()

  with pytest.raises(Crash):  # After epoch 1's events.
    fit(tmp_path, callbacks=[crash])
  fit(tmp_path)
  assert_events_are_the_metrics(tmp_path)


def test_fit_copies_writes_each_copys_events_in_its_stage(tmp_path):
  ds = learnable_dataset()
  model, inits, seeds = two_copies()
  stages = [tmp_path / 'a', tmp_path / 'b']
  train.fit_copies(model, inits, data.device_put_dataset(ds), ds.spec, OPTIONS,
                   stage_dirs=stages, seeds=seeds, checkpoint_dir=tmp_path / 'group')
  for stage in stages:
    assert_events_are_the_metrics(stage)
  assert scalars(stages[0])['train/loss'] != scalars(stages[1])['train/loss']
  assert not (tmp_path / 'group' / 'copies-3-4' / checkpoint.TENSORBOARD).exists()
