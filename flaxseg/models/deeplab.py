"""DeepLab v3 (Chen et al. 2017, "Rethinking Atrous Convolution for Semantic
Image Segmentation") on ResNet backbones.

Two families of constructors:

* paper variants (``deeplabv3_resnet{18,34,50,101}``): output stride 16,
  multi-grid (1, 2, 4) in layer4 (sec. 3.2), ASPP rates (6, 12, 18) at output
  stride 16, doubled at 8 and halved at 32 (sec. 3.3), ASPP width 256, dropout
  0.1 after the projection and BatchNorm decay 0.9997 (the TF DeepLab code),
  1x1 classifier straight after ASPP, logits upsampled with
  ``align_corners=True`` as the TF DeepLab code does (with input sizes of the
  form ``k * output_stride + 1``, such as 513, feature ``i`` then sits exactly
  on input pixel ``i * output_stride``, which is where the symmetric padding of
  the strided convolutions centres it).
* torchvision variants (``deeplabv3_resnet{50,101}_tv``): torchvision's
  ``deeplabv3_resnet*`` exactly (same parameter count): output stride 8, no
  multi-grid, rates (12, 24, 36), ASPP dropout 0.5, an extra 3x3 conv + BN +
  ReLU before the classifier, BatchNorm momentum 0.9 (PyTorch's 0.1) and an
  optional FCN auxiliary head on layer3, ``align_corners=False`` upsampling
  (torchvision's ``F.interpolate``).

Parameter names, torchvision name on the right::

  backbone/...            backbone.*  (see resnet.py)
  aspp/...                classifier.0.*  (see aspp.py)
  head_conv, head_bn      classifier.1, classifier.2
  classifier              classifier.4
  aux_conv, aux_bn        aux_classifier.0, aux_classifier.1
  aux_classifier          aux_classifier.4
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models import resnet
from flaxseg.models.aspp import ASPP, PAPER_RATES_OS16, scale_rates
from flaxseg.models.fcn_tv import fcn_head
from flaxseg.models.layers import (canonicalize_dtype, conv_kernel_init,
                                   conv_module, make_norm, output_dtype,
                                   resize_bilinear, resolve_conv_impl)

Array = jax.Array

#: torchvision's ASPP rates, used at its output stride 8.
TV_RATES_OS8 = (12, 24, 36)


class DeepLabV3(nn.Module):
  """ResNet + ASPP + classifier, logits upsampled to the input size.

  Attributes:
    num_classes: output classes.
    depth: ResNet depth.
    base_width: ResNet stem width (64 in the paper).
    output_stride: 8, 16 or 32.
    multi_grid: layer4 unit rates, or None.
    aspp_rates: the three atrous rates; None means (6, 12, 18) rescaled from
      output stride 16 to `output_stride`.
    aspp_width: channels of ASPP (and of the extra head conv).
    aspp_dropout: dropout rate after the ASPP projection.
    head_conv: torchvision's extra 3x3 conv + BN + ReLU before the classifier.
    aux: FCN auxiliary head on layer3 (torchvision ``FCNHead``).
    aux_dropout: dropout rate of the auxiliary head (torchvision 0.1).
    bn_momentum: Flax BatchNorm momentum for every BatchNorm.
    bn_axis_name: axis name for synchronised BatchNorm, or None.
    frozen_bn: use `FrozenBatchNorm` for every BatchNorm of the model.
    dtype: computation dtype; parameters stay float32, logits are float32.
    align_corners: corner convention of the final bilinear upsampling.
    remat: rematerialise the backbone's residual blocks in the backward pass.
    conv_impl: convolution implementation, 'xla', 'matmul', 'taps' or 'auto'
      (`layers.conv_module`); the parameters are the same.
    scan_blocks: scan over the backbone's repeated residual blocks
      (`resnet.ResNet.scan_blocks`; same parameters and results; for
      TPU/GPU compile time, much slower on XLA:CPU).
  """
  num_classes: int
  depth: int = 50
  base_width: int = 64
  output_stride: int = 16
  multi_grid: Optional[Tuple[int, ...]] = (1, 2, 4)
  aspp_rates: Optional[Tuple[int, ...]] = None
  aspp_width: int = 256
  aspp_dropout: float = 0.1
  head_conv: bool = False
  aux: bool = False
  aux_dropout: float = 0.1
  bn_momentum: float = 0.9997
  bn_axis_name: Optional[str] = None
  frozen_bn: bool = False
  dtype: Any = jnp.float32
  align_corners: bool = False
  remat: bool = False
  conv_impl: str = 'xla'
  scan_blocks: bool = False

  @nn.compact
  def __call__(self, x: Array, train: bool = False
               ) -> Tuple[Array, Dict[str, Array]]:
    """Segments a batch of images.

    Args:
      x: normalised images (N, H, W, 3).
      train: batch statistics with ``batch_stats`` updates (pass
        ``mutable=['batch_stats']``) and dropout (``'dropout'`` rng).

    Returns:
      ``(logits, aux)``: float32 logits (N, H, W, num_classes) and a dict,
      holding ``'aux_logits'`` (same shape) when `aux` is on.
    """
    dtype = canonicalize_dtype(self.dtype)
    height, width = x.shape[1:3]
    rates = self.aspp_rates
    if rates is None:
      rates = scale_rates(PAPER_RATES_OS16, 16, self.output_stride)
    bn = dict(bn_momentum=self.bn_momentum, bn_axis_name=self.bn_axis_name,
              frozen_bn=self.frozen_bn, dtype=dtype, conv_impl=self.conv_impl)
    conv = functools.partial(conv_module(self.conv_impl), dtype=dtype,
                             kernel_init=conv_kernel_init)
    norm = make_norm(momentum=self.bn_momentum, axis_name=self.bn_axis_name,
                     frozen=self.frozen_bn, dtype=dtype)
    ura = not train

    features = resnet.ResNet(
        depth=self.depth, base_width=self.base_width,
        output_stride=self.output_stride, multi_grid=self.multi_grid,
        remat=self.remat, scan_blocks=self.scan_blocks, name='backbone',
        **bn)(x, train)
    y = ASPP(rates=tuple(rates), width=self.aspp_width,
             dropout=self.aspp_dropout, name='aspp', **bn)(
                 features['layer4'], train)
    if self.head_conv:
      y = conv(self.aspp_width, (3, 3), padding=((1, 1), (1, 1)),
               use_bias=False, name='head_conv')(y)
      y = nn.relu(norm(name='head_bn')(y, use_running_average=ura))
    logits = conv(self.num_classes, (1, 1), use_bias=True,
                  name='classifier')(y)
    logits = resize_bilinear(logits.astype(output_dtype(dtype)),
                             (height, width),
                             align_corners=self.align_corners)

    aux = {}
    if self.aux:
      a = fcn_head(features['layer3'], num_classes=self.num_classes,
                   prefix='aux', classifier_name='aux_classifier', conv=conv,
                   norm=norm, dropout=self.aux_dropout, train=train)
      aux['aux_logits'] = resize_bilinear(a.astype(output_dtype(dtype)),
                                          (height, width),
                                          align_corners=self.align_corners)
    return logits, aux


def _build(depth: int, native_rates: Sequence[int], native_stride: int,
           head_conv: bool, args: Dict[str, Any]) -> DeepLabV3:
  """Validates constructor arguments and builds the module."""
  num_classes = args['num_classes']
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f'num_classes={num_classes!r} must be a positive integer')
  multi_grid = args['multi_grid']
  multi_grid = None if multi_grid is None else tuple(int(u) for u in multi_grid)
  resnet.validate_config(depth, args['output_stride'], multi_grid,
                         args['base_width'])
  rates = args['aspp_rates']
  if rates is None:
    rates = scale_rates(native_rates, native_stride, args['output_stride'])
  rates = tuple(int(r) for r in rates)
  if len(rates) != 3 or min(rates) < 1:
    raise ValueError(f'aspp_rates={args["aspp_rates"]!r} must be three '
                     'positive integers')
  for key in ('aspp_dropout', 'aux_dropout'):
    if not 0.0 <= args[key] < 1.0:
      raise ValueError(f'{key}={args[key]!r} must be in [0, 1)')
  return DeepLabV3(
      num_classes=num_classes, depth=depth, base_width=args['base_width'],
      output_stride=args['output_stride'], multi_grid=multi_grid,
      aspp_rates=rates, aspp_width=args['aspp_width'],
      aspp_dropout=args['aspp_dropout'], head_conv=head_conv,
      aux=bool(args['aux']), aux_dropout=float(args['aux_dropout']),
      bn_momentum=args['bn_momentum'],
      bn_axis_name=args['bn_axis_name'], frozen_bn=bool(args['frozen_bn']),
      dtype=canonicalize_dtype(args['dtype']),
      align_corners=bool(args['align_corners']), remat=bool(args['remat']),
      conv_impl=resolve_conv_impl(args['conv_impl']),
      scan_blocks=bool(args['scan_blocks']))


_PAPER_DOC = """DeepLab v3 on ResNet-{depth} with the paper settings.

  Args:
    num_classes: output classes.
    dtype: computation dtype ('float32', 'bfloat16' or a jnp dtype).
    output_stride: 8, 16 (paper default for training) or 32.
    multi_grid: layer4 unit rates (sec. 3.2), None for none.
    aspp_rates: None for (6, 12, 18) rescaled to `output_stride`.
    aspp_width: ASPP channels.
    aspp_dropout: dropout after the ASPP projection.
    bn_momentum: Flax BatchNorm momentum (TF DeepLab decay 0.9997).
    bn_axis_name: axis name for synchronised BatchNorm, or None.
    frozen_bn: freeze every BatchNorm.
    base_width: ResNet stem width (shrink for tiny demo models).
    aux: add the FCN auxiliary head on layer3.
    aux_dropout: dropout rate of the auxiliary head (torchvision 0.1).
    align_corners: upsampling convention (True: TF DeepLab).
    remat: rematerialise the backbone's residual blocks (memory).
    conv_impl: 'xla', 'matmul' (`MatmulConv`: per-tap matmuls, XLA's
      convolution where that is faster), 'taps' (per-tap matmuls only) or
      'auto' (matmul on CPU).
    scan_blocks: run repeated residual blocks as one ``jax.lax.scan``
      (`resnet.ResNet.scan_blocks`: same parameters and results; for
      TPU/GPU compile time, much slower on XLA:CPU).

  Returns:
    A `DeepLabV3` module.
  """

_TV_DOC = """torchvision's ``deeplabv3_resnet{depth}`` (same parameters).

  Args:
    num_classes: output classes.
    dtype: computation dtype ('float32', 'bfloat16' or a jnp dtype).
    output_stride: 8 (torchvision), 16 or 32.
    multi_grid: layer4 unit rates, None (torchvision) for none.
    aspp_rates: None for (12, 24, 36) rescaled from output stride 8.
    aspp_width: ASPP and head channels.
    aspp_dropout: dropout after the ASPP projection (torchvision 0.5).
    bn_momentum: Flax BatchNorm momentum (0.9 = PyTorch's 0.1).
    bn_axis_name: axis name for synchronised BatchNorm, or None.
    frozen_bn: freeze every BatchNorm.
    base_width: ResNet stem width.
    aux: add torchvision's FCN auxiliary head on layer3.
    aux_dropout: dropout rate of the auxiliary head (torchvision 0.1).
    align_corners: upsampling convention (False: torchvision).
    remat: rematerialise the backbone's residual blocks (memory).
    conv_impl: 'xla', 'matmul' (`MatmulConv`: per-tap matmuls, XLA's
      convolution where that is faster), 'taps' (per-tap matmuls only) or
      'auto' (matmul on CPU).
    scan_blocks: run repeated residual blocks as one ``jax.lax.scan``
      (`resnet.ResNet.scan_blocks`: same parameters and results; for
      TPU/GPU compile time, much slower on XLA:CPU).

  Returns:
    A `DeepLabV3` module.
  """


def _paper(depth):
  def constructor(*, num_classes: int, dtype: Any = 'float32',
                  output_stride: int = 16,
                  multi_grid: Optional[Sequence[int]] = (1, 2, 4),
                  aspp_rates: Optional[Sequence[int]] = None,
                  aspp_width: int = 256, aspp_dropout: float = 0.1,
                  bn_momentum: float = 0.9997,
                  bn_axis_name: Optional[str] = None, frozen_bn: bool = False,
                  base_width: int = 64, aux: bool = False,
                  aux_dropout: float = 0.1,
                  align_corners: bool = True,
                  remat: bool = False,
                  conv_impl: str = 'auto',
                  scan_blocks: bool = False) -> DeepLabV3:
    return _build(depth, PAPER_RATES_OS16, 16, False, dict(locals()))
  constructor.__name__ = constructor.__qualname__ = f'deeplabv3_resnet{depth}'
  constructor.__doc__ = _PAPER_DOC.format(depth=depth)
  return constructor


def _torchvision(depth):
  def constructor(*, num_classes: int, dtype: Any = 'float32',
                  output_stride: int = 8,
                  multi_grid: Optional[Sequence[int]] = None,
                  aspp_rates: Optional[Sequence[int]] = None,
                  aspp_width: int = 256, aspp_dropout: float = 0.5,
                  bn_momentum: float = 0.9,
                  bn_axis_name: Optional[str] = None, frozen_bn: bool = False,
                  base_width: int = 64, aux: bool = False,
                  aux_dropout: float = 0.1,
                  align_corners: bool = False,
                  remat: bool = False,
                  conv_impl: str = 'auto',
                  scan_blocks: bool = False) -> DeepLabV3:
    return _build(depth, TV_RATES_OS8, 8, True, dict(locals()))
  constructor.__name__ = constructor.__qualname__ = (
      f'deeplabv3_resnet{depth}_tv')
  constructor.__doc__ = _TV_DOC.format(depth=depth)
  return constructor


deeplabv3_resnet18 = _paper(18)
deeplabv3_resnet34 = _paper(34)
deeplabv3_resnet50 = _paper(50)
deeplabv3_resnet101 = _paper(101)
deeplabv3_resnet50_tv = _torchvision(50)
deeplabv3_resnet101_tv = _torchvision(101)
