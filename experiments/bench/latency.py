r"""Does shrinking pay? Eval-mode latency of shrunk models (presets and global MACs targets on
l1 scores, at every --round_to multiple) against the full one, next to the MACs ratio (bench
README, section 3).
"""

import jax
from absl import flags, logging

import common
from jaxprune import models
from jaxprune.kernels import compiler
from jaxprune.prune import criteria, flops, program, select, shrink

FLAGS = flags.FLAGS
flags.DEFINE_integer('batch', 128, 'Batch size.', lower_bound=1)
flags.DEFINE_integer('reps', 7, 'Timed round-robin repetitions.', lower_bound=1)
flags.DEFINE_list('vgg_targets', ['0.5', '0.25'], 'Global MACs targets for VGG-16.')
flags.DEFINE_list('resnet_targets', ['0.75', '0.5', '0.25'], 'Global MACs targets for ResNet-56.')
flags.DEFINE_list('models', ['vgg16', 'resnet56'], 'Models.')
flags.DEFINE_list('round_to', ['1', '8'],
                  'Also time every pruning level with widths rounded up to these multiples '
                  '(select round_to; 1 = exact widths).')
flags.DEFINE_string('out', None, 'Write the table as JSON here.')
for _name in ('vgg_targets', 'resnet_targets'):
  common.validate_entries(_name, float, lambda t: 0 < t <= 1,
                          f'--{_name} entries are fractions of the MACs in (0, 1], e.g. 0.5,0.25.')
common.validate_entries('round_to', int, lambda r: r >= 1,
                        '--round_to entries are whole numbers >= 1, e.g. 1,8.')

PRESETS = {'vgg16': ['vgg16_a'], 'resnet56': ['resnet56_a', 'resnet56_b']}


def main():
  logging.set_verbosity(logging.WARNING)
  rows = []
  for name in FLAGS.models:
    model = models.build(name)
    x = jax.random.normal(jax.random.key(0), (FLAGS.batch, 32, 32, 3))
    variables = models.init(model, jax.random.key(1), (32, 32, 3))
    prog = program.derive(model, (32, 32, 3))
    struct = prog.structure
    scores = criteria.score('l1', prog, variables, None)
    full = flops.count(struct)
    levels = [(f'preset {p}', dict(preset=p), 'preset') for p in PRESETS.get(name, [])]
    targets = FLAGS.vgg_targets if name.startswith('vgg') else FLAGS.resnet_targets
    levels += [(f'macs {t}', dict(target_macs=float(t)), 'macs') for t in targets]

    forward = lambda m: compiler.jit(lambda v, x: m.apply(v, x, train=False),
                                     xla_options=m.performance.xla_options)
    fns = [('full', forward(model), variables, 1.0)]
    for label, kwargs, policy in levels:
      for multiple in (int(r) for r in FLAGS.round_to):
        masks = select.select(policy, struct, scores, round_to=multiple, **kwargs)
        widths, small_vars, _ = shrink.shrink(prog, variables, masks)
        tag = f'{label}, x{multiple} widths' if multiple > 1 else label
        fns.append((tag, forward(models.build(name, widths=widths)), small_vars,
                    flops.count(struct, widths).macs / full.macs))

    for _, fn, v, _ in fns:
      common.block(fn(v, x))  # compile
    times = {label: [] for label, *_ in fns}
    for _ in range(FLAGS.reps):
      for label, fn, v, _ in fns:
        times[label].append(common.timed(fn, v, x)[0])
    base = common.median(times['full'])
    for label, _, _, macs_ratio in fns:
      latency = common.median(times[label])
      ratio = latency / base
      rows.append({'model': name, 'pruning': label, 'macs_ratio': macs_ratio,
                   'latency_ms': latency * 1e3, 'latency_ratio': ratio,
                   'ok': 'yes' if ratio <= 1.1 * macs_ratio else 'no'})
      print(common.format_table([rows[-1]]).splitlines()[-1], flush=True)

  print(f'\neval-mode forward, batch {FLAGS.batch}, float32, backend {jax.default_backend()}, '
        f'median of {FLAGS.reps} round-robin repetitions; l1 scores of the initial weights; '
        'ok = latency_ratio <= 1.1 x macs_ratio')
  print(common.format_table(rows))
  common.write_json(FLAGS.out, batch=FLAGS.batch, rows=rows)


if __name__ == '__main__':
  common.run(main)
