r"""A class-balanced, seeded subset of an npz dataset (the CIFAR-10 sample is sorted by class).

    python -m experiments.subset --data_path=/work/shared/data/cifar10_sample.npz \
        --per_class=200 --out=/tmp/cifar10_2k.npz

`--max_train=N` keeps a fixed random subset of N training images, so its classes are
only roughly balanced. This writes exactly `--per_class` images of every class
(first-come within a seeded permutation) and the whole test split, outside the
repository, for when exact balance matters.
"""

import argparse

import numpy as np


def balanced(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
  """Indices of `per_class` examples of every class, in a seeded random order."""
  order = np.random.default_rng(seed).permutation(len(labels))
  picked = np.concatenate([order[labels[order] == c][:per_class] for c in np.unique(labels)])
  return np.sort(picked)[np.random.default_rng(seed + 1).permutation(len(picked))]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--data_path', required=True)
  parser.add_argument('--per_class', type=int, default=200)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', required=True)
  args = parser.parse_args(argv)
  d = np.load(args.data_path)
  idx = balanced(d['train_labels'], args.per_class, args.seed)
  np.savez(args.out, train_images=d['train_images'][idx], train_labels=d['train_labels'][idx],
           test_images=d['test_images'], test_labels=d['test_labels'])
  print(f"{args.out}: {len(idx)} train ({np.bincount(d['train_labels'][idx]).tolist()}), "
        f"{len(d['test_labels'])} test")


if __name__ == '__main__':
  main()
