r"""A class-balanced, seeded subset of an npz dataset (the CIFAR-10 sample is sorted by class).

    python -m experiments.subset --data_path=cifar10_sample.npz \
        --per_class=200 --out=/tmp/cifar10_2k.npz

`--max_train=N` keeps a fixed random subset of N training images, so its classes are
only roughly balanced. This writes exactly `--per_class` images of every class
(first-come within a seeded permutation) and the whole test split, outside the
repository, for when exact balance matters.
"""

import os

import numpy as np
from absl import flags

from experiments import common


def balanced(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
  """Indices of `per_class` examples of every class, in a seeded random order."""
  order = np.random.default_rng(seed).permutation(len(labels))
  picked = np.concatenate([order[labels[order] == c][:per_class] for c in np.unique(labels)])
  return np.sort(picked)[np.random.default_rng(seed + 1).permutation(len(picked))]


def main(argv=None):
  flag_values = flags.FlagValues()
  flags.DEFINE_string('data_path', None, 'The npz to take the subset of.',
                      flag_values=flag_values, required=True)
  flags.DEFINE_integer('per_class', 200, 'Training images kept of every class.',
                       flag_values=flag_values)
  flags.DEFINE_integer('seed', 0, 'Seed of the permutation.', flag_values=flag_values)
  flags.DEFINE_string('out', None, 'The npz to write; it must not exist yet.',
                      flag_values=flag_values, required=True)
  from jaxprune.errors import exit_on_user_error
  with exit_on_user_error():
    _write_subset(common.parse(flag_values, argv, 'python -m experiments.subset', __doc__))


def _write_subset(args) -> None:
  from jaxprune import data
  from jaxprune.errors import ConfigError
  if os.path.exists(args.out):
    raise ConfigError(f'out {args.out!r} exists; remove it or choose another path (nothing '
                      'was written).', settings=('out',))
  if args.per_class < 1:
    raise ConfigError(f'per_class must be at least 1, got {args.per_class}.',
                      settings=('per_class',))
  # The same checks (keys, ranks, dtypes, label range) as every run that reads an npz.
  d = data.load('npz', data_path=args.data_path)
  counts = np.bincount(d.train_labels)
  classes = np.flatnonzero(counts)
  smallest = classes[np.argmin(counts[classes])]
  if counts[smallest] < args.per_class:
    raise ConfigError(f'per_class {args.per_class} exceeds the {counts[smallest]} training '
                      f'images of class {smallest}.', settings=('per_class',))
  idx = balanced(d.train_labels, args.per_class, args.seed)
  np.savez(args.out, train_images=d.train_images[idx], train_labels=d.train_labels[idx],
           test_images=d.test_images, test_labels=d.test_labels)
  print(f"{args.out}: {len(idx)} train ({np.bincount(d.train_labels[idx]).tolist()}), "
        f"{len(d.test_labels)} test")


if __name__ == '__main__':
  main()
