"""DeepLab v3+ (Chen et al., ECCV 2018, "Encoder-Decoder with Atrous Separable
Convolution for Semantic Image Segmentation") on ResNet backbones.

Encoder (sec. 3.1): DeepLab v3 exactly as `deeplab.deeplabv3_resnet*` builds
it: atrous ResNet at output stride 16 (8 and 32 also work), multi-grid
(1, 2, 4) in layer4 by default, ASPP with image pooling, rates (6, 12, 18) at
output stride 16 rescaled to other strides, 256 channels, dropout 0.1 after
the projection.

Decoder (sec. 3.1, fig. 2, tables 1 and 2): the stride-4 backbone features
(ResNet layer1; TF DeepLab takes the same resolution from
``block1/unit_2``) are projected by a 1x1 convolution to 48 channels + BN +
ReLU (table 1: 48 is best); the encoder output is upsampled bilinearly to
their size (x4 at output stride 16) and concatenated with them; two 3x3
convolutions of 256 channels, each with BN + ReLU (table 2: ``[3x3, 256] x
2``), refine the result; a 1x1 classifier with bias gives the logits, which
are upsampled bilinearly (x4) to the input size. The paper uses depthwise
separable convolutions in ASPP and the decoder with its Xception backbone
(sec. 3.2); with ResNet-101 (sec. 4.1-4.2) they are regular convolutions, as
here. Every convolution except the classifier has no bias.

As in the paper DeepLab v3 (see deeplab.py) both resizes use
``align_corners=True`` (the TF DeepLab code) and BatchNorm decay 0.9997.

Parameter names, TF DeepLab and jfzhang95/pytorch-deeplab-xception names
on the right::

  backbone/...                 resnet_v1_*/ ; backbone.*  (see resnet.py)
  aspp/...                     aspp0..4, concat_projection ; aspp.*
  decoder/project_{conv,bn}    decoder/feature_projection0 ; decoder.conv1, bn1
  decoder/conv{1,2}, bn{1,2}   decoder/decoder_conv{0,1} ;
                               decoder.last_conv.{0,1} and .{4,5}
  classifier                   logits/semantic ; decoder.last_conv.8
  aux_conv, aux_bn,            optional torchvision-style FCNHead on layer3
  aux_classifier               (not in the paper)
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
                                   make_norm, resize_bilinear)

Array = jax.Array


class Decoder(nn.Module):
  """The DeepLab v3+ decoder up to (not including) the classifier.

  Attributes:
    low_level_width: channels of the 1x1 projection of the low-level
      features (48 in the paper).
    width: channels of the two 3x3 refinement convolutions (256).
    bn_momentum: Flax BatchNorm momentum.
    bn_axis_name: axis name for synchronised BatchNorm, or None.
    frozen_bn: use `FrozenBatchNorm`.
    dtype: computation dtype; parameters stay float32.
    align_corners: corner convention of the encoder-output upsampling.
  """
  low_level_width: int = 48
  width: int = 256
  bn_momentum: float = 0.9997
  bn_axis_name: Optional[str] = None
  frozen_bn: bool = False
  dtype: Any = jnp.float32
  align_corners: bool = True

  @nn.compact
  def __call__(self, encoded: Array, low_level: Array,
               train: bool = False) -> Array:
    """Fuses the encoder output with the low-level features.

    Args:
      encoded: encoder (ASPP) output (N, h, w, C).
      low_level: stride-4 backbone features (N, H4, W4, C_low).
      train: batch statistics and ``batch_stats`` updates on.

    Returns:
      (N, H4, W4, width) features in `dtype`.
    """
    dtype = canonicalize_dtype(self.dtype)
    conv = functools.partial(nn.Conv, use_bias=False, dtype=dtype,
                             kernel_init=conv_kernel_init)
    norm = make_norm(momentum=self.bn_momentum, axis_name=self.bn_axis_name,
                     frozen=self.frozen_bn, dtype=dtype)
    ura = not train
    low = conv(self.low_level_width, (1, 1), padding='VALID',
               name='project_conv')(low_level)
    low = nn.relu(norm(name='project_bn')(low, use_running_average=ura))
    up = resize_bilinear(encoded.astype(dtype), low.shape[1:3],
                         align_corners=self.align_corners)
    y = jnp.concatenate([up, low], axis=-1)
    for i in (1, 2):
      y = conv(self.width, (3, 3), padding=((1, 1), (1, 1)),
               name=f'conv{i}')(y)
      y = nn.relu(norm(name=f'bn{i}')(y, use_running_average=ura))
    return y


class DeepLabV3Plus(nn.Module):
  """ResNet + ASPP encoder, v3+ decoder, logits upsampled to the input size.

  Attributes:
    num_classes: output classes.
    depth: ResNet depth.
    base_width: ResNet stem width (64 in the paper).
    output_stride: 8, 16 (paper) or 32.
    multi_grid: layer4 unit rates, or None.
    aspp_rates: the three atrous rates; None means (6, 12, 18) rescaled from
      output stride 16 to `output_stride`.
    aspp_width: channels of ASPP.
    aspp_dropout: dropout rate after the ASPP projection.
    low_level_width: channels of the decoder's low-level projection (48).
    decoder_width: channels of the decoder's 3x3 convolutions (256).
    aux: torchvision-style FCN auxiliary head on layer3.
    aux_dropout: dropout rate of the auxiliary head.
    bn_momentum: Flax BatchNorm momentum for every BatchNorm.
    bn_axis_name: axis name for synchronised BatchNorm, or None.
    frozen_bn: use `FrozenBatchNorm` for every BatchNorm of the model.
    dtype: computation dtype; parameters stay float32, logits are float32.
    align_corners: corner convention of both bilinear upsamplings.
    scan_blocks: scan over the backbone's repeated residual blocks
      (`resnet.ResNet.scan_blocks`; same parameters and results; for
      TPU/GPU compile time, much slower on XLA:CPU).
  """
  num_classes: int
  depth: int = 101
  base_width: int = 64
  output_stride: int = 16
  multi_grid: Optional[Tuple[int, ...]] = (1, 2, 4)
  aspp_rates: Optional[Tuple[int, ...]] = None
  aspp_width: int = 256
  aspp_dropout: float = 0.1
  low_level_width: int = 48
  decoder_width: int = 256
  aux: bool = False
  aux_dropout: float = 0.1
  bn_momentum: float = 0.9997
  bn_axis_name: Optional[str] = None
  frozen_bn: bool = False
  dtype: Any = jnp.float32
  align_corners: bool = True
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
    rates = self.aspp_rates
    if rates is None:
      rates = scale_rates(PAPER_RATES_OS16, 16, self.output_stride)
    bn = dict(bn_momentum=self.bn_momentum, bn_axis_name=self.bn_axis_name,
              frozen_bn=self.frozen_bn, dtype=dtype)
    conv = functools.partial(nn.Conv, dtype=dtype,
                             kernel_init=conv_kernel_init)

    features = resnet.ResNet(
        depth=self.depth, base_width=self.base_width,
        output_stride=self.output_stride, multi_grid=self.multi_grid,
        scan_blocks=self.scan_blocks, name='backbone', **bn)(x, train)
    y = ASPP(rates=tuple(rates), width=self.aspp_width,
             dropout=self.aspp_dropout, name='aspp', **bn)(
                 features['layer4'], train)
    y = Decoder(low_level_width=self.low_level_width,
                width=self.decoder_width, align_corners=self.align_corners,
                name='decoder', **bn)(y, features['layer1'], train)
    logits = conv(self.num_classes, (1, 1), use_bias=True,
                  name='classifier')(y)
    logits = resize_bilinear(logits.astype(jnp.float32), size,
                             align_corners=self.align_corners)
    aux = {}
    if self.aux:
      norm = make_norm(momentum=self.bn_momentum, axis_name=self.bn_axis_name,
                       frozen=self.frozen_bn, dtype=dtype)
      a = fcn_head(features['layer3'], num_classes=self.num_classes,
                   prefix='aux', classifier_name='aux_classifier', conv=conv,
                   norm=norm, dropout=self.aux_dropout, train=train)
      aux['aux_logits'] = resize_bilinear(a.astype(jnp.float32), size,
                                          align_corners=self.align_corners)
    return logits, aux


def _positive_int(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f'{name}={value!r} must be a positive integer')
  return value


def _rate(name: str, value: Any) -> float:
  if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
    raise ValueError(f'{name}={value!r} must be a rate in [0, 1)')
  return float(value)


def _build(depth: int, args: Dict[str, Any]) -> DeepLabV3Plus:
  """Validates constructor arguments and builds the module."""
  num_classes = _positive_int('num_classes', args['num_classes'])
  multi_grid = args['multi_grid']
  multi_grid = None if multi_grid is None else tuple(int(u) for u in multi_grid)
  resnet.validate_config(depth, args['output_stride'], multi_grid,
                         args['base_width'])
  rates = args['aspp_rates']
  if rates is None:
    rates = scale_rates(PAPER_RATES_OS16, 16, args['output_stride'])
  rates = tuple(int(r) for r in rates)
  if len(rates) != 3 or min(rates) < 1:
    raise ValueError(f'aspp_rates={args["aspp_rates"]!r} must be three '
                     'positive integers')
  return DeepLabV3Plus(
      num_classes=num_classes, depth=depth, base_width=args['base_width'],
      output_stride=args['output_stride'], multi_grid=multi_grid,
      aspp_rates=rates,
      aspp_width=_positive_int('aspp_width', args['aspp_width']),
      aspp_dropout=_rate('aspp_dropout', args['aspp_dropout']),
      low_level_width=_positive_int('low_level_width',
                                    args['low_level_width']),
      decoder_width=_positive_int('decoder_width', args['decoder_width']),
      aux=bool(args['aux']),
      aux_dropout=_rate('aux_dropout', args['aux_dropout']),
      bn_momentum=args['bn_momentum'], bn_axis_name=args['bn_axis_name'],
      frozen_bn=bool(args['frozen_bn']),
      dtype=canonicalize_dtype(args['dtype']),
      align_corners=bool(args['align_corners']),
      scan_blocks=bool(args['scan_blocks']))


_DOC = """DeepLab v3+ on ResNet-{depth} with the paper settings.

  Args:
    num_classes: output classes.
    dtype: computation dtype ('float32', 'bfloat16' or a jnp dtype).
    output_stride: 8, 16 (paper default for training) or 32.
    multi_grid: layer4 unit rates (DeepLab v3 sec. 3.2), None for none (as
      most PyTorch reimplementations).
    aspp_rates: None for (6, 12, 18) rescaled to `output_stride`.
    aspp_width: ASPP channels.
    aspp_dropout: dropout after the ASPP projection.
    low_level_width: decoder projection of the layer1 features (paper 48).
    decoder_width: channels of the decoder's two 3x3 convolutions (256).
    bn_momentum: Flax BatchNorm momentum (TF DeepLab decay 0.9997).
    bn_axis_name: axis name for synchronised BatchNorm, or None.
    frozen_bn: freeze every BatchNorm.
    base_width: ResNet stem width (shrink for tiny demo models).
    aux: add an FCN auxiliary head on layer3 (not in the paper).
    aux_dropout: dropout rate of the auxiliary head.
    align_corners: upsampling convention (True: TF DeepLab).
    scan_blocks: run repeated residual blocks as one ``jax.lax.scan``
      (`resnet.ResNet.scan_blocks`: same parameters and results; for
      TPU/GPU compile time, much slower on XLA:CPU).

  Returns:
    A `DeepLabV3Plus` module.

  Raises:
    ValueError: naming the offending argument.
  """


def _paper(depth):
  def constructor(*, num_classes: int, dtype: Any = 'float32',
                  output_stride: int = 16,
                  multi_grid: Optional[Sequence[int]] = (1, 2, 4),
                  aspp_rates: Optional[Sequence[int]] = None,
                  aspp_width: int = 256, aspp_dropout: float = 0.1,
                  low_level_width: int = 48, decoder_width: int = 256,
                  bn_momentum: float = 0.9997,
                  bn_axis_name: Optional[str] = None, frozen_bn: bool = False,
                  base_width: int = 64, aux: bool = False,
                  aux_dropout: float = 0.1,
                  align_corners: bool = True,
                  scan_blocks: bool = False) -> DeepLabV3Plus:
    return _build(depth, dict(locals()))
  constructor.__name__ = constructor.__qualname__ = (
      f'deeplabv3plus_resnet{depth}')
  constructor.__doc__ = _DOC.format(depth=depth)
  return constructor


deeplabv3plus_resnet18 = _paper(18)
deeplabv3plus_resnet50 = _paper(50)
deeplabv3plus_resnet101 = _paper(101)
