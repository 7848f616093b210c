"""Model registry: name -> constructor.

``create_model(name, *, num_classes, **kwargs)`` builds a registered model and
``list_models()`` names them. Every constructor takes keyword arguments only;
the common ones are ``dtype``, ``output_stride``, ``bn_momentum``,
``bn_axis_name`` and ``frozen_bn`` (see docs/ARCHITECTURE.md). Model code
lives in the family modules (resnet.py, aspp.py, deeplab.py, ...).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List

import flax.linen as nn

from flaxseg.models import (crfasrnn, deeplab, deeplab_v1, deeplab_v2,
                            deeplab_v3plus, fcn, fcn_tv, unet)

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, constructor: Callable[..., nn.Module]
                   ) -> Callable[..., nn.Module]:
  """Registers `constructor` under `name`.

  Args:
    name: registry key.
    constructor: callable taking keyword-only arguments, ``num_classes``
      among them, and returning a Flax module.

  Returns:
    `constructor`, unchanged.

  Raises:
    ValueError: if `name` is already registered.
  """
  if name in _REGISTRY:
    raise ValueError(f'model {name!r} is already registered')
  _REGISTRY[name] = constructor
  return constructor


def list_models() -> List[str]:
  """Returns the registered model names, sorted."""
  return sorted(_REGISTRY)


def accepted_kwargs(name: str) -> List[str]:
  """Returns the keyword arguments model `name` accepts besides num_classes.

  Args:
    name: a registered model name.

  Returns:
    Sorted keyword names.
  """
  _check_name(name)
  params = inspect.signature(_REGISTRY[name]).parameters
  return sorted(k for k in params if k != 'num_classes')


def default_kwargs(name: str) -> Dict[str, Any]:
  """Returns the default of each keyword argument of model `name` that has one.

  Args:
    name: a registered model name.

  Returns:
    ``{argument: default}``.
  """
  _check_name(name)
  params = inspect.signature(_REGISTRY[name]).parameters
  return {k: p.default for k, p in params.items()
          if k != 'num_classes' and p.default is not inspect.Parameter.empty}


def _check_name(name: str) -> None:
  if name not in _REGISTRY:
    raise ValueError(f'unknown model {name!r}; registered models: '
                     f'{", ".join(list_models())}')


def create_model(name: str, *, num_classes: int, **kwargs) -> nn.Module:
  """Builds the registered model `name`.

  Args:
    name: a name from `list_models()`.
    num_classes: output classes.
    **kwargs: model options; see `accepted_kwargs(name)`.

  Returns:
    An unbound Flax module whose ``apply(variables, images, train=...)``
    returns ``(logits, aux)``.

  Raises:
    ValueError: for an unknown name, an unknown keyword argument (the message
      lists the accepted ones) or an invalid value.
  """
  _check_name(name)
  accepted = accepted_kwargs(name)
  unknown = sorted(set(kwargs) - set(accepted))
  if unknown:
    raise ValueError(f'unknown argument(s) {", ".join(map(repr, unknown))} '
                     f'for model {name!r}; accepted: {", ".join(accepted)}')
  return _REGISTRY[name](num_classes=num_classes, **kwargs)


for _constructor in (
    fcn.fcn32s, fcn.fcn16s, fcn.fcn8s, crfasrnn.crfasrnn,
    fcn_tv.fcn_resnet50_tv, fcn_tv.fcn_resnet101_tv,
    unet.unet_original, unet.unet,
    deeplab_v1.deeplabv1_largefov,
    deeplab_v2.deeplabv2_resnet101, deeplab_v2.deeplabv2_vgg16,
    deeplab.deeplabv3_resnet18, deeplab.deeplabv3_resnet34,
    deeplab.deeplabv3_resnet50, deeplab.deeplabv3_resnet101,
    deeplab.deeplabv3_resnet50_tv, deeplab.deeplabv3_resnet101_tv,
    deeplab_v3plus.deeplabv3plus_resnet18,
    deeplab_v3plus.deeplabv3plus_resnet50,
    deeplab_v3plus.deeplabv3plus_resnet101):
  register_model(_constructor.__name__, _constructor)
del _constructor
