"""Weight-level (unstructured) magnitude pruning: 0/1 masks over individual conv weights.

Han et al.'s pruning as [R]'s `cifar/weight-level/` code runs it: a conv weight is kept
iff its |w| (the `l1` criterion of one weight) is above the threshold, |w| sorted ascending
at index int(total * ratio), over all conv kernels together with `selection` global, within
each kernel with `selection` layer. A weight equal to the threshold is removed, so
int(total * ratio) + 1 weights go (more on ties; ratio 0 removes the smallest one). Dense
layers, BN and biases are never masked ([R] prunes convolutions only).

The masks are a `train.WEIGHT_MASKS` collection (0/1 float32 arrays at the kernels' param
paths), not a shrink: the network keeps its widths, and training holds the masked weights
at zero (`train.train_step`). `flops.count_masked` counts the MACs that remain.
"""

from typing import Mapping

import numpy as np
from flax import traverse_util

from jaxprune.prune.structure import Structure

GRANULARITIES = {
    'channel': 'remove whole channels (the criterion scores channels; the network is shrunk)',
    'weight': "remove individual conv weights by |w| ([R]'s weight-level pruning; the network "
              'keeps its widths, the removed weights are held at zero): criterion l1, '
              'selection global or layer',
}
WEIGHT_SELECTIONS = ('global', 'layer')
WEIGHT_CRITERION = 'l1'


def conv_kernels(structure: Structure) -> list[tuple[str, ...]]:
  """The param paths (collection dropped) of every conv kernel, in the structure's order."""
  return [key[1:] for key in structure.positions if len(structure.shapes[key]) == 4]


def _keep_above(magnitudes: np.ndarray, ratio: float) -> float:
  ordered = np.sort(magnitudes, axis=None)
  return ordered[min(int(ordered.size * ratio), ordered.size - 1)]


def magnitude_masks(structure: Structure, params: Mapping, ratio: float,
                    selection: str = 'global') -> dict:
  """Weight masks keeping the conv weights whose |w| is above the threshold (module
  docstring) of `selection` ('global' or 'layer'), as a nested dict of float32 arrays."""
  if selection not in WEIGHT_SELECTIONS:
    raise ValueError(f'weight-level selection must be one of {WEIGHT_SELECTIONS}, '
                     f'got {selection!r}.')
  flat = traverse_util.flatten_dict(dict(params))
  keys = conv_kernels(structure)
  magnitudes = {key: np.abs(np.asarray(flat[key], np.float32)) for key in keys}
  if selection == 'global':
    threshold = _keep_above(np.concatenate([m.ravel() for m in magnitudes.values()]), ratio)
    thresholds = dict.fromkeys(keys, threshold)
  else:
    thresholds = {key: _keep_above(m, ratio) for key, m in magnitudes.items()}
  return traverse_util.unflatten_dict(
      {key: (m > thresholds[key]).astype(np.float32) for key, m in magnitudes.items()})


def densities(weight_masks: Mapping) -> dict[str, float]:
  """The kept fraction of every masked kernel, keyed by its '/'-joined param path."""
  return {'/'.join(key): float(np.mean(mask))
          for key, mask in traverse_util.flatten_dict(dict(weight_masks)).items()}


def kept_fraction(weight_masks: Mapping) -> float:
  """The kept fraction of all masked weights together."""
  masks = traverse_util.flatten_dict(dict(weight_masks)).values()
  return sum(float(np.sum(m)) for m in masks) / sum(np.size(m) for m in masks)


def rescale_for_density(params: Mapping, weight_masks: Mapping) -> dict:
  """Fresh conv kernels with their init std divided by sqrt(kept fraction), per kernel.

  [R]'s scratch-E and scratch-B draw a masked kernel from N(0, 2 / n), n its kept weights
  over its input channels: the He fan-out init (jaxprune's conv init) of its nonzero weights
  alone. A kernel with nothing kept stays as it is (all zeros once masked).
  """
  flat = traverse_util.flatten_dict(dict(params))
  for key, mask in traverse_util.flatten_dict(dict(weight_masks)).items():
    density = float(np.mean(mask))
    if density > 0:
      flat[key] = flat[key] / np.sqrt(density)
  return traverse_util.unflatten_dict(flat)
