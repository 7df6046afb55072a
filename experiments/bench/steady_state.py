r"""Steady-state training throughput: calls of --steps steps (one `lax.fori_loop`) against steps
one by one, and one copy against K vmapped copies, compilation timed apart (bench README,
sections 11 and 13).
"""

import itertools
import time

import jax
import numpy as np
from absl import flags

import common
from jaxprune import data, models, train
from jaxprune.train.step import accumulate_metrics, epoch_programs, train_calls

FLAGS = flags.FLAGS
flags.DEFINE_list('models', ['resnet20'], 'Models (jaxprune registry names).')
flags.DEFINE_list('batches', ['128'], 'Batch sizes (per copy).')
flags.DEFINE_list('precisions', ['float32'], 'Compute dtypes (train.PRECISIONS).')
flags.DEFINE_list('copies', ['1', '2', '4', '8'], 'Copy counts K (1: one run).')
flags.DEFINE_list('modes', ['calls', 'steps'], 'calls and/or steps (module docstring).')
flags.DEFINE_integer('steps', 10, 'Steps per timed call.', lower_bound=1)
flags.DEFINE_integer('repeats', 2, 'Timed calls per measurement (the median is reported).',
                     lower_bound=1)
flags.DEFINE_string('data_path', None, 'The CIFAR-10 .npz (uint8 NHWC train_images, '
                    'train_labels, test_images, test_labels); required.')
flags.DEFINE_string('out', None, 'Write the table as JSON here.')
flags.DEFINE_string('worker', None, 'Internal: model,batch,precision of one worker.')
common.validate_entries('modes', str, lambda m: m in ('calls', 'steps'),
                        '--modes entries are calls or steps.')


def _measure(trainer, arrays, spec, variables_of, copies, batch, mode):
  """{'compile_s', 'call_s' (each timed call), 'images_per_second'} of one program."""
  seeds = list(range(copies))
  state = (trainer.init_state([variables_of(s) for s in seeds], seeds) if copies > 1
           else trainer.init_state(variables_of(0), 0))
  images, labels = arrays['train_images'], arrays['train_labels']
  permutation, make_batch = epoch_programs(trainer, arrays, spec, batch)
  order = permutation(state.rng, 0)
  zeros = lambda dtype: trainer.replicate(np.zeros((copies,) if copies > 1 else (), dtype))
  sums = {'loss': zeros(np.float32), 'accuracy': zeros(np.float32)}
  bad = {'step': zeros(np.int32), 'loss': zeros(np.float32)}
  limit = np.float32(np.inf)  # Notes only a NaN loss: the health check is not timed here.
  steps_per_epoch = order.shape[-2]
  rates = jax.device_put(np.full(steps_per_epoch, 0.01, np.float32), trainer.replicated)
  if mode == 'calls':
    compile_s, compiled = common.timed(lambda: train_calls(trainer, spec).lower(
        state, sums, bad, None, images, labels, order, rates, limit, np.int32(0),
        np.int32(FLAGS.steps)).compile())

    def run(carry, step):
      return compiled(*carry, None, images, labels, order, rates, limit, np.int32(step),
                      np.int32(step + FLAGS.steps))
  else:
    batch0 = make_batch(order, state.rng, 0)
    learning_rate = np.float32(0.01)
    compile_s, compiled = common.timed(
        lambda: trainer.train_step.lower(state, batch0, None, learning_rate).compile())

    def run(carry, step):
      state, sums, bad = carry
      for i in range(step, step + FLAGS.steps):
        state, metrics = compiled(state, make_batch(order, state.rng, i), None, learning_rate)
        sums, bad = accumulate_metrics(sums, bad, metrics, state.step, limit)
      return state, sums, bad

  # Untimed: the batch maker's and the sum's compiles.
  carry = common.block(run((state, sums, bad), 0))
  step, call_s = FLAGS.steps, []
  for _ in range(FLAGS.repeats):
    step = 0 if step + FLAGS.steps > steps_per_epoch else step
    seconds, carry = common.timed(run, carry, step)
    call_s.append(seconds)
    step += FLAGS.steps
  return {'compile_s': compile_s, 'call_s': call_s,
          'images_per_second': copies * batch * FLAGS.steps / common.median(call_s)}


def worker(spec_text: str) -> dict:
  name, batch, precision = spec_text.split(',')
  batch = int(batch)
  ds = data.load('npz', data_path=FLAGS.data_path)
  arrays = data.device_put_dataset(ds)
  model = models.build(name, num_classes=ds.num_classes)
  variables_of = lambda seed: jax.device_get(models.init(model, jax.random.key(seed),
                                                         ds.image_shape))
  mesh = train.make_mesh()
  rows = []
  for copies in map(int, FLAGS.copies):
    trainer = train.trainer_for(model, train.OptimizerConfig(), None, mesh, precision,
                                copies > 1)
    for mode in FLAGS.modes:
      rows.append({'model': name, 'batch': batch, 'precision': precision, 'copies': copies,
                   'mode': mode, 'steps': FLAGS.steps,
                   'train_images': int(ds.train_labels.shape[0]),
                   **_measure(trainer, arrays, ds.spec, variables_of, copies, batch, mode)})
      # What finished so far, should a slow grid be stopped before its worker ends.
      common.write_json(FLAGS.out and FLAGS.out + '.partial', rows=rows)
  return {'rows': rows}


def _annotate(rows: list[dict]) -> None:
  """Adds vs_sequential (vmapped K against K sequential copies) and calls_vs_steps."""
  by_key = {(r['model'], r['batch'], r['precision'], r['copies'], r['mode']): r for r in rows}
  for r in rows:
    one = by_key.get((r['model'], r['batch'], r['precision'], 1, r['mode']))
    if one is not None:
      r['vs_sequential'] = r['images_per_second'] / one['images_per_second']
    steps = by_key.get((r['model'], r['batch'], r['precision'], r['copies'], 'steps'))
    if r['mode'] == 'calls' and steps is not None:
      r['calls_vs_steps'] = r['images_per_second'] / steps['images_per_second']


def main():
  common.require_data_path(FLAGS.data_path)
  rows = []
  for name, batch, precision in itertools.product(FLAGS.models, FLAGS.batches, FLAGS.precisions):
    started = time.time()
    rows += common.run_worker([f'--worker={name},{batch},{precision}'])['rows']
    print(f'{name} batch {batch} {precision}: {time.time() - started:.0f} s', flush=True)
    _annotate(rows)
    common.write_json(FLAGS.out, rows=rows, flags={f: getattr(FLAGS, f) for f in (
        'models', 'batches', 'precisions', 'copies', 'modes', 'steps', 'repeats')})
  print(common.format_table(rows, ['model', 'batch', 'precision', 'copies', 'mode',
                                   'compile_s', 'images_per_second', 'vs_sequential',
                                   'calls_vs_steps']))


if __name__ == '__main__':
  common.run(main, worker)
