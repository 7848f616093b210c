"""torchvision-compatible FCN on dilated ResNet backbones.

torchvision's ``fcn_resnet50`` / ``fcn_resnet101`` (``models/segmentation/
fcn.py``), the ResNet form of the fully convolutional network of Long,
Shelhamer and Darrell (CVPR 2015): instead of the VGG-16 skip architecture
(FCN-32s/16s/8s, sec. 4.2), a ResNet whose layer3 and layer4 strides are
replaced by dilation (``replace_stride_with_dilation=[False, True, True]``,
output stride 8), then ``FCNHead(2048, num_classes)``: a 3x3 convolution to
``2048 // 4 = 512`` channels without bias, BatchNorm, ReLU, dropout 0.1 and a
1x1 classifier with bias. Logits are upsampled bilinearly with
``align_corners=False`` (``F.interpolate``) to the input size. The optional
auxiliary head is another ``FCNHead`` on layer3 (1024 -> 256 channels).
BatchNorm momentum 0.9 (PyTorch's 0.1). With 21 classes the parameter counts
equal torchvision's: 32,957,013 (ResNet-50) and 51,949,141 (ResNet-101);
35,322,218 and 54,314,346 with the auxiliary head.

Parameter names, torchvision name on the right::

  backbone/...            backbone.*  (see resnet.py)
  head_conv, head_bn      classifier.0, classifier.1
  classifier              classifier.4
  aux_conv, aux_bn        aux_classifier.0, aux_classifier.1
  aux_classifier          aux_classifier.4

`fcn_head` builds the head inside a parent's ``@nn.compact`` method, so the
names stay flat as above; `deeplab_v3plus` reuses it for its auxiliary head.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models import resnet
from flaxseg.models.layers import (ModuleDef, canonicalize_dtype,
                                   conv_kernel_init, conv_module, make_norm,
                                   output_dtype, resize_bilinear,
                                   resolve_conv_impl)

Array = jax.Array


def fcn_head(x: Array, *, num_classes: int, prefix: str, classifier_name: str,
             conv: ModuleDef, norm: ModuleDef, dropout: float,
             train: bool) -> Array:
  """torchvision's ``FCNHead``, called inside a parent's compact method.

  3x3 conv to ``channels // 4`` (no bias), BatchNorm, ReLU, dropout, 1x1
  classifier with bias.

  Args:
    x: features (N, H, W, C).
    num_classes: output channels.
    prefix: names the conv and BatchNorm ``{prefix}_conv``, ``{prefix}_bn``.
    classifier_name: name of the 1x1 classifier.
    conv: convolution constructor (dtype and kernel init bound).
    norm: normalisation constructor (see `make_norm`).
    dropout: dropout rate before the classifier (torchvision 0.1).
    train: batch statistics and dropout (``'dropout'`` rng) on.

  Returns:
    Logits (N, H, W, num_classes) in the computation dtype.
  """
  y = conv(x.shape[-1] // 4, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
           name=f'{prefix}_conv')(x)
  y = nn.relu(norm(name=f'{prefix}_bn')(y, use_running_average=not train))
  y = nn.Dropout(dropout, deterministic=not train)(y)
  return conv(num_classes, (1, 1), use_bias=True, name=classifier_name)(y)


class FCNResNet(nn.Module):
  """Dilated ResNet + FCNHead, logits upsampled to the input size.

  Attributes:
    num_classes: output classes.
    depth: ResNet depth.
    base_width: ResNet stem width (64 in torchvision).
    output_stride: 8 (torchvision), 16 or 32.
    dropout: dropout rate of the main head (torchvision 0.1).
    aux: FCNHead on layer3 (torchvision ``aux_loss=True``).
    aux_dropout: dropout rate of the auxiliary head (torchvision 0.1).
    bn_momentum: Flax BatchNorm momentum for every BatchNorm.
    bn_axis_name: axis name for synchronised BatchNorm, or None.
    frozen_bn: use `FrozenBatchNorm` for every BatchNorm of the model.
    dtype: computation dtype; parameters stay float32, logits are float32.
    align_corners: corner convention of the final bilinear upsampling.
    conv_impl: convolution implementation, 'xla', 'matmul', 'taps' or 'auto'
      (`layers.conv_module`); the parameters are the same.
    scan_blocks: scan over the backbone's repeated residual blocks
      (`resnet.ResNet.scan_blocks`; same parameters and results; for
      TPU/GPU compile time, much slower on XLA:CPU).
  """
  num_classes: int
  depth: int = 50
  base_width: int = 64
  output_stride: int = 8
  dropout: float = 0.1
  aux: bool = False
  aux_dropout: float = 0.1
  bn_momentum: float = 0.9
  bn_axis_name: Optional[str] = None
  frozen_bn: bool = False
  dtype: Any = jnp.float32
  align_corners: bool = False
  conv_impl: str = 'xla'
  scan_blocks: bool = False

  @nn.compact
  def __call__(self, x: Array, train: bool = False
               ) -> Tuple[Array, Dict[str, Array]]:
    """Segments a batch of images.

    Args:
      x: normalised images (N, H, W, 3), any H and W.
      train: batch statistics with ``batch_stats`` updates (pass
        ``mutable=['batch_stats']``) and dropout (``'dropout'`` rng).

    Returns:
      ``(logits, aux)``: float32 logits (N, H, W, num_classes) and a dict,
      holding ``'aux_logits'`` (same shape) when `aux` is on.
    """
    dtype = canonicalize_dtype(self.dtype)
    size = x.shape[1:3]
    conv = functools.partial(conv_module(self.conv_impl), dtype=dtype,
                             kernel_init=conv_kernel_init)
    norm = make_norm(momentum=self.bn_momentum, axis_name=self.bn_axis_name,
                     frozen=self.frozen_bn, dtype=dtype)
    head = functools.partial(fcn_head, num_classes=self.num_classes,
                             conv=conv, norm=norm, train=train)

    features = resnet.ResNet(
        depth=self.depth, base_width=self.base_width,
        output_stride=self.output_stride, bn_momentum=self.bn_momentum,
        bn_axis_name=self.bn_axis_name, frozen_bn=self.frozen_bn, dtype=dtype,
        conv_impl=self.conv_impl, scan_blocks=self.scan_blocks,
        name='backbone')(x, train)
    logits = head(features['layer4'], prefix='head',
                  classifier_name='classifier', dropout=self.dropout)
    logits = resize_bilinear(logits.astype(output_dtype(dtype)), size,
                             align_corners=self.align_corners)
    aux = {}
    if self.aux:
      a = head(features['layer3'], prefix='aux',
               classifier_name='aux_classifier', dropout=self.aux_dropout)
      aux['aux_logits'] = resize_bilinear(
          a.astype(output_dtype(dtype)), size,
          align_corners=self.align_corners)
    return logits, aux


def _check_rate(name: str, value: float) -> float:
  if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
    raise ValueError(f'{name}={value!r} must be a rate in [0, 1)')
  return float(value)


def _build(depth: int, args: Dict[str, Any]) -> FCNResNet:
  """Validates constructor arguments and builds the module."""
  num_classes = args['num_classes']
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f'num_classes={num_classes!r} must be a positive integer')
  resnet.validate_config(depth, args['output_stride'], None,
                         args['base_width'])
  return FCNResNet(
      num_classes=num_classes, depth=depth, base_width=args['base_width'],
      output_stride=args['output_stride'],
      dropout=_check_rate('dropout', args['dropout']), aux=bool(args['aux']),
      aux_dropout=_check_rate('aux_dropout', args['aux_dropout']),
      bn_momentum=args['bn_momentum'], bn_axis_name=args['bn_axis_name'],
      frozen_bn=bool(args['frozen_bn']),
      dtype=canonicalize_dtype(args['dtype']),
      align_corners=bool(args['align_corners']),
      conv_impl=resolve_conv_impl(args['conv_impl']),
      scan_blocks=bool(args['scan_blocks']))


_DOC = """torchvision's ``fcn_resnet{depth}`` (same parameters).

  Args:
    num_classes: output classes.
    dtype: computation dtype ('float32', 'bfloat16' or a jnp dtype).
    output_stride: 8 (torchvision), 16 or 32.
    bn_momentum: Flax BatchNorm momentum (0.9 = PyTorch's 0.1).
    bn_axis_name: axis name for synchronised BatchNorm, or None.
    frozen_bn: freeze every BatchNorm.
    base_width: ResNet stem width (shrink for tiny models).
    aux: add the auxiliary FCNHead on layer3 (torchvision ``aux_loss``).
    dropout: dropout rate of the main head (torchvision 0.1).
    aux_dropout: dropout rate of the auxiliary head (torchvision 0.1).
    align_corners: upsampling convention (False: torchvision).
    conv_impl: 'xla', 'matmul', 'taps' or 'auto' (`layers.CONV_IMPLS`).
    scan_blocks: run repeated residual blocks as one ``jax.lax.scan``
      (`resnet.ResNet.scan_blocks`: same parameters and results; for
      TPU/GPU compile time, much slower on XLA:CPU).

  Returns:
    An `FCNResNet` module.

  Raises:
    ValueError: naming the offending argument.
  """


def _torchvision(depth):
  def constructor(*, num_classes: int, dtype: Any = 'float32',
                  output_stride: int = 8, bn_momentum: float = 0.9,
                  bn_axis_name: Optional[str] = None, frozen_bn: bool = False,
                  base_width: int = 64, aux: bool = False,
                  dropout: float = 0.1, aux_dropout: float = 0.1,
                  align_corners: bool = False,
                  conv_impl: str = 'auto',
                  scan_blocks: bool = False) -> FCNResNet:
    return _build(depth, dict(locals()))
  constructor.__name__ = constructor.__qualname__ = f'fcn_resnet{depth}_tv'
  constructor.__doc__ = _DOC.format(depth=depth)
  return constructor


fcn_resnet50_tv = _torchvision(50)
fcn_resnet101_tv = _torchvision(101)
