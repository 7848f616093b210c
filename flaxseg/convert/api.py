"""Importing torchvision weights into flaxseg models.

* :func:`import_model`: a whole torchvision segmentation model
  (``fcn_resnet50/101``, ``deeplabv3_resnet50/101``, with or without the
  auxiliary head) into its ``_tv`` twin; every tensor must fit.
* :func:`import_backbone`: an ImageNet classifier (ResNet-18..152, VGG-16)
  as the ``backbone`` subtree of flaxseg's models, the classifier dropped.
* :func:`fit_backbone`: a converted backbone shaped for one model. VGG-16's
  fc6/fc7 are stored as torchvision has them (7x7x512x4096, 4096x4096); for
  DeepLab's 1024-channel 3x3 fc6 they are subsampled as DeepLab v1 did
  (Chen et al., ICLR 2015, sec. 4.1: "we spatially subsample (by simple
  decimation) the first FC layer to 4x4 (or 3x3) spatial size", and keep
  every 4th of the 4096 filters, DeepLab-LargeFOV's "decimating fc6 and fc7
  filters"); models without fc6/fc7 in their backbone get the convolutions
  only.
* :func:`backbone_arch`: which backbone a registry model has.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from flaxseg import models
from flaxseg.convert import tables
from flaxseg.convert.core import ConversionError, convert
from flaxseg.models import resnet, vgg

_VGG_MODELS = ('fcn32s', 'fcn16s', 'fcn8s', 'crfasrnn', 'deeplabv1_largefov',
               'deeplabv2_vgg16')


def backbone_arch(model_name: str) -> str:
  """The ImageNet backbone (a key of ``tables.BACKBONES``) of a model.

  Raises:
    ConversionError: for models without an importable backbone (U-Net).
  """
  match = re.search(r'resnet(\d+)', model_name)
  if match and f'resnet{match.group(1)}' in tables.BACKBONES:
    return f'resnet{match.group(1)}'
  if model_name in _VGG_MODELS:
    return 'vgg16'
  raise ConversionError(f'model {model_name!r} has no ImageNet backbone that '
                        'flaxseg can import (ResNet or VGG-16 models only)')


def _abstract_variables(module, shape=(1, 64, 64, 3)):
  variables = jax.eval_shape(
      lambda: module.init(jax.random.key(0), jnp.zeros(shape), train=False))
  return {'params': variables['params'],
          'batch_stats': variables.get('batch_stats', {})}


def _under_backbone(variables):
  return {c: ({'backbone': variables[c]} if variables.get(c) else {})
          for c in ('params', 'batch_stats')}


def reference_backbone(arch: str):
  """The abstract variables of ``arch`` as converted (under ``backbone``)."""
  if arch not in tables.BACKBONES:
    raise ConversionError(f'unknown backbone {arch!r}; expected one of '
                          f'{", ".join(tables.BACKBONES)}')
  if arch == 'vgg16':
    module = vgg.VGG16(style='fcn', include_fc=True, fc6_padding='SAME')
    # fc6's 7x7 VALID conv needs >= 7x7 after pool5: 224 input.
    return _under_backbone(_abstract_variables(module, (1, 224, 224, 3)))
  module = resnet.ResNet(depth=int(arch[len('resnet'):]))
  return _under_backbone(_abstract_variables(module))


def import_backbone(state_dict: Mapping[str, np.ndarray], arch: str, *,
                    source: str = 'state dict') -> Dict[str, Any]:
  """An ImageNet classifier's weights as flaxseg ``backbone`` variables.

  Args:
    state_dict: torchvision ``resnet*()`` or ``vgg16()`` tensors.
    arch: ``'resnet50'``, ``'resnet101'``, ..., or ``'vgg16'``.
    source: names the weights in messages.

  Returns:
    ``{'params': {'backbone': ...}, 'batch_stats': {'backbone': ...}}``
    (VGG-16 with fc6/fc7 in torchvision's shapes, as 7x7 and 1x1 convs).

  Raises:
    ConversionError: naming every missing, unexpected or misshaped tensor.
  """
  table, ignored = tables.backbone_table(arch)
  return convert(state_dict, table, reference_backbone(arch), ignored=ignored,
                 source=source)


def _decimate(kernel: np.ndarray, shape: Tuple[int, ...], path: str
              ) -> np.ndarray:
  """Subsamples a (kh, kw, cin, cout) kernel to ``shape`` by decimation."""
  out = kernel
  for axis, (have, want) in enumerate(zip(kernel.shape, shape)):
    if have == want:
      continue
    if axis < 2:
      # Evenly spaced taps, both ends kept: 7 -> 3 takes 0, 3, 6.
      index = np.round(np.linspace(0, have - 1, want)).astype(int)
    elif have % want == 0:
      index = np.arange(0, have, have // want)
    else:
      raise ConversionError(f'{path}: cannot decimate {kernel.shape} to '
                            f'{shape} ({have} channels to {want})')
    out = np.take(out, index, axis=axis)
  return out


def fit_backbone(variables: Mapping[str, Any], target: Mapping[str, Any],
                 *, source: str = 'backbone') -> Dict[str, Any]:
  """Converted backbone variables reshaped for the ``target`` model.

  Only VGG-16's ``backbone/fc6`` and ``backbone/fc7`` change: kept when the
  target has the same shapes, decimated when it has smaller ones (DeepLab),
  dropped when its backbone has none (DeepLab v2 VGG, whose branches own
  theirs). Every other array is passed through for the caller's shape check.

  Args:
    variables: ``{'params', 'batch_stats'}`` from :func:`import_backbone`.
    target: the model's (abstract) variables.
    source: names the weights in messages.

  Returns:
    The variables to merge into the model.
  """
  params = traverse_util.flatten_dict(dict(variables.get('params') or {}),
                                      sep='/')
  want = traverse_util.flatten_dict(dict(target.get('params') or {}), sep='/')
  out = {}
  for path, value in params.items():
    if not re.match(r'backbone/fc[67]/', path):
      out[path] = value
      continue
    if path not in want:
      continue                       # the model's backbone has no fc6/fc7
    shape = tuple(want[path].shape)
    value = np.asarray(value)
    if value.shape != shape and path.endswith('/kernel'):
      value = _decimate(value, shape, f'{source}: {path}')
    elif value.shape != shape and path.endswith('/bias'):
      if value.shape[0] % shape[0]:
        raise ConversionError(f'{source}: {path}: cannot decimate '
                              f'{value.shape} to {shape}')
      value = value[::value.shape[0] // shape[0]]
    out[path] = value
  return {'params': traverse_util.unflatten_dict(out, sep='/'),
          'batch_stats': variables.get('batch_stats') or {}}


def import_model(state_dict: Mapping[str, np.ndarray], name: str, *,
                 num_classes: Optional[int] = None, aux: Optional[bool] = None,
                 source: str = 'state dict'
                 ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """A torchvision segmentation model's weights for its flaxseg twin.

  Args:
    state_dict: torchvision ``fcn_resnet*`` / ``deeplabv3_resnet*`` tensors.
    name: ``'deeplabv3_resnet101'`` (or ``'deeplabv3_resnet101_tv'``), ...
    num_classes: default: the classifier's output channels.
    aux: whether the auxiliary head is imported; default: whether the state
      dict has one.
    source: names the weights in messages.

  Returns:
    ``(variables, model_kwargs)``: ``{'params', 'batch_stats'}`` numpy trees
    and the ``create_model`` arguments they fit (``name``, ``num_classes``,
    ``aux``).

  Raises:
    ConversionError: naming every missing, unexpected or misshaped tensor.
  """
  name = tables.MODELS.get(name, name)
  if name not in tables.MODELS.values():
    raise ConversionError(f'no torchvision twin for {name!r}; expected one of '
                          f'{", ".join(sorted(tables.MODELS.values()))}')
  if num_classes is None:
    if 'classifier.4.weight' not in state_dict:
      raise ConversionError(f'{source}: no classifier.4.weight; is this a '
                            f'torchvision {name[:-3]} state dict?')
    num_classes = int(state_dict['classifier.4.weight'].shape[0])
  if aux is None:
    aux = any(k.startswith('aux_classifier.') for k in state_dict)
  model = models.create_model(name, num_classes=num_classes, aux=bool(aux))
  table, ignored = tables.model_table(name, bool(aux))
  if not aux:
    ignored += (r'^aux_classifier\.',)
  variables = convert(state_dict, table, _abstract_variables(model),
                      ignored=ignored, source=source)
  return variables, {'name': name, 'num_classes': num_classes,
                     'aux': bool(aux)}
