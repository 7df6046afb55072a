"""Model registry: the names the `model` setting accepts -> their constructors.

Every model is a Flax Linen module (a `layers.Network`) with `default_widths()`,
`prunable_groups()`, `group_layers()` and `__call__(x, train=False)`, and the fields
`num_classes`, `widths` (a frozen mapping, so that models hash and compare by value),
`performance` (the `PerformanceOptions` its layers compute with), `bn_scale_init` (every
BatchNorm's initial gamma) and `dense_init` (every Dense kernel's initialiser, a key of
`layers.DENSE_INITS`). A pruned model is the same class built with smaller `widths`.
"""

import functools
from typing import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.errors import ConfigError, choose
from jaxprune.kernels import compiler
from jaxprune.kernels.options import PerformanceOptions
from jaxprune.models import layers, own
from jaxprune.models.densenet import DenseNet
from jaxprune.models.own import OwnModel
from jaxprune.models.resnet import (IMAGENET_DEPTHS, SHORTCUTS, ImageNetResNet, PreResNet,
                                    ResNet, WideResNet)
from jaxprune.models.tiny import TinyCNN
from jaxprune.models.vgg import CFGS, VGG, ImageNetVGG

MODELS: dict[str, Callable[..., nn.Module]] = {
    'tiny': TinyCNN,
    **{name: functools.partial(VGG, cfg=cfg) for name, cfg in CFGS.items()},
    **{f'{name}_mlp': functools.partial(VGG, cfg=cfg, classifier='mlp')
       for name, cfg in CFGS.items()},
    **{f'resnet{d}': functools.partial(ResNet, depth=d) for d in (8, 20, 32, 44, 56, 110)},
    **{f'preresnet{d}': functools.partial(PreResNet, depth=d) for d in (11, 20, 56, 110, 164)},
    **{f'wrn{d}_{k}': functools.partial(WideResNet, depth=d, widen_factor=k)
       for d, k in ((10, 1), (16, 2), (40, 1), (40, 2))},
    **{f'densenet{d}': functools.partial(DenseNet, depth=d) for d in (10, 16, 40)},
    'densenet100_c': functools.partial(DenseNet, depth=100, compression=2),
    # ImageNet (224x224): torchvision's names, the `--arch` values of [R]'s and [M]'s ImageNet
    # code; none is a CIFAR name (resnet{8,20,32,44,56,110}, vgg{11,13,16,19}).
    **{f'resnet{d}': functools.partial(ImageNetResNet, depth=d) for d in IMAGENET_DEPTHS},
    **{f'{name}_bn': functools.partial(ImageNetVGG, cfg=CFGS[name]) for name in ('vgg11', 'vgg16')},
    'vgg11_bn_fcbn': functools.partial(ImageNetVGG, cfg=CFGS['vgg11'], classifier='bn'),
}


def build(name: str, num_classes: int = 10, widths: Mapping[str, int] | None = None,
          performance: PerformanceOptions | None = None,
          width_multiplier: float = 1.0, bn_scale_init: float = 1.0,
          dense_init: str = 'lecun_normal', resnet_shortcut: str = 'subsample',
          image_shape=(32, 32, 3)) -> nn.Module:
  """Returns the registered model `name`, with default widths unless `widths` is given.

  A `name` package.module:factory is a researcher's own model (`own.OwnModel`, built for
  `image_shape`); its `widths` are kept channels per group (indices, or a count for the
  first ones), and the options that shape built-in layers do not apply to it.

  `width_multiplier` scales the default widths (`layers.Network.scaled`), not explicit
  `widths`. `bn_scale_init` and `dense_init` choose the initial values; `resnet_shortcut`
  the basic-block ResNets' downsampling shortcut (a key of `resnet.SHORTCUTS`; ConfigError
  for another family unless it is the default).
  """
  performance = PerformanceOptions() if performance is None else performance
  if own.is_own(name):
    given = {'width_multiplier': (width_multiplier, 1.0), 'bn_scale_init': (bn_scale_init, 1.0),
             'dense_init': (dense_init, 'lecun_normal'),
             'resnet_shortcut': (resnet_shortcut, 'subsample')}
    changed = [k for k, (value, default) in given.items() if value != default]
    if changed:
      raise ConfigError(f"{', '.join(changed)} shape{'s' if len(changed) == 1 else ''} the "
                        f"built-in models' layers; model={name} is your own, whose layers "
                        'its factory makes.', settings=('model', *changed))
    model = own.OwnModel(name, num_classes, tuple(image_shape), performance=performance)
    if not widths:
      return model
    full = widths_of(model)
    # Kept channels are indices (a subset) or a count; a group keeping all is not cut.
    cut = {g: k for g, k in widths.items() if (k if np.ndim(k) == 0 else len(k)) < full[g]}
    return model.with_kept(cut) if cut else model
  choose('model', name, MODELS)
  choose('Dense initialiser', dense_init, layers.DENSE_INITS, setting='dense_init')
  # The model freezes `widths` (layers.Network), which also copies it.
  model = MODELS[name](num_classes=num_classes, widths=widths, performance=performance,
                       bn_scale_init=bn_scale_init, dense_init=dense_init)
  if resnet_shortcut != 'subsample':
    choose('ResNet shortcut', resnet_shortcut, SHORTCUTS, setting='resnet_shortcut')
    if not isinstance(model, ResNet):
      cifar = [n for n, make in MODELS.items() if getattr(make, 'func', None) is ResNet]
      raise ConfigError(f'resnet_shortcut={resnet_shortcut} is for the CIFAR basic-block '
                        f"ResNets ({', '.join(cifar)}), not {name}.",
                        settings=('resnet_shortcut', 'model'))
    model = model.clone(shortcut=resnet_shortcut)
  if widths is None and width_multiplier != 1.0:
    model = model.scaled(width_multiplier)
  return model


def widths_of(model: nn.Module) -> dict[str, int]:
  """The widths a model is built with: the given ones or its defaults (own: kept channels)."""
  if isinstance(model, own.OwnModel):
    from jaxprune.prune import program
    full = program.derive(model.full(), model.image_shape).structure.widths
    return {**full, **{g: len(k) for g, k in model.kept}}
  return dict(model.widths) if model.widths is not None else model.default_widths()


def init(model: nn.Module, rng: jax.Array, image_shape) -> dict:
  """The model's initial variables for (H, W, C) images, from one compiled program per model
  (eager `model.init` compiles every primitive separately), equal to eager init's to float
  rounding. An own model initialises as its factory does, a pruned one by `program.fresh_init`."""
  x = np.zeros((1,) + tuple(image_shape), np.float32)
  if not isinstance(model, own.OwnModel):
    return _init_program(model)(rng, x)
  if not model.kept:
    return model.init(rng, x)
  from jaxprune.prune import program
  return program.fresh_init(model, rng, image_shape)


# Keyed by the model (models hash by value): a new jit of the bound `model.init` would
# compile again for every seed of the same model.
@functools.lru_cache(maxsize=8)
def _init_program(model: nn.Module) -> Callable:
  return compiler.jit_once(model.init, xla_options=model.performance.xla_options)


def init_shapes(model: nn.Module, image_shape) -> dict:
  """The shapes and dtypes of `init`'s variables, computing nothing."""
  if isinstance(model, own.OwnModel):
    from jaxprune.prune import program
    return program.pruned_shapes(model) if model.kept else model.init_shapes()
  return jax.eval_shape(model.init, jax.random.key(0),
                        jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32))
