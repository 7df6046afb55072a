"""Model registry: names accepted by `--model` -> constructors taking (num_classes, widths).

Every model is a Flax Linen module with `default_widths()`, `prunable_groups()` and
`__call__(x, train=False, masks=None)`; a pruned model is the same class built
with smaller `widths`.
"""

import functools
from typing import Callable, Mapping

import flax.linen as nn

from jaxprune.errors import choose
from jaxprune.models.densenet import DenseNet
from jaxprune.models.resnet import PreResNet, ResNet, WideResNet
from jaxprune.models.tiny import TinyCNN
from jaxprune.models.vgg import CFGS, VGG

MODELS: dict[str, Callable[..., nn.Module]] = {
    'tiny': TinyCNN,
    **{name: functools.partial(VGG, cfg=cfg) for name, cfg in CFGS.items()},
    **{f'{name}_mlp': functools.partial(VGG, cfg=cfg, classifier='mlp') for name, cfg in CFGS.items()},
    **{f'resnet{d}': functools.partial(ResNet, depth=d) for d in (8, 20, 32, 44, 56, 110)},
    **{f'preresnet{d}': functools.partial(PreResNet, depth=d) for d in (11, 20, 56, 164)},
    'wrn10_1': functools.partial(WideResNet, depth=10, widen_factor=1),
    'wrn16_2': functools.partial(WideResNet, depth=16, widen_factor=2),
    'wrn40_1': functools.partial(WideResNet, depth=40, widen_factor=1),
    'wrn40_2': functools.partial(WideResNet, depth=40, widen_factor=2),
    'densenet10': functools.partial(DenseNet, depth=10),
    'densenet16': functools.partial(DenseNet, depth=16),
    'densenet40': functools.partial(DenseNet, depth=40),
}


def build(name: str, num_classes: int = 10, widths: Mapping[str, int] | None = None) -> nn.Module:
  """Returns the registered model `name`, with default widths unless `widths` is given."""
  choose('model', name, MODELS)
  return MODELS[name](num_classes=num_classes, widths=None if widths is None else dict(widths))


def widths_of(model: nn.Module) -> dict[str, int]:
  """The widths a model is built with (its defaults when none were given)."""
  return dict(model.widths) if model.widths is not None else model.default_widths()
