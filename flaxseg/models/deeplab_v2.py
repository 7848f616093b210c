"""DeepLab v2 (Chen et al., TPAMI 2017, "DeepLab: Semantic Image Segmentation
with Deep Convolutional Nets, Atrous Convolution, and Fully Connected CRFs").

Atrous Spatial Pyramid Pooling as v2 defines it (sec. 3.3, fig. 4): parallel
branches on the output-stride-8 features, each with its own atrous rate and
each predicting class scores; the branch scores are SUMMED (not concatenated
as in v3's ASPP, `flaxseg.models.aspp`). ASPP-L uses rates (6, 12, 18, 24),
ASPP-S (2, 4, 8, 12). The summed scores are bilinearly upsampled to the input
size (sec. 3.1: the paper upsamples by 8 and hands the result to the dense
CRF; ``aux['logits_stride8']`` keeps the low-resolution scores for that).

Two constructors:

* ``deeplabv2_resnet101``: each branch is one 3x3 atrous convolution from
  layer4 (2048 channels) straight to ``num_classes`` (with bias), the
  released Caffe model's ``fc1_voc12_c{0..3}``. The backbone is
  `flaxseg.models.resnet.ResNet` in torchvision's layout (dilation replaces
  the strides of layer3 and layer4). The Caffe ResNet-101 differs slightly
  (stride on the first 1x1 convolution of a block instead of the 3x3, BN
  split into BatchNorm + Scale layers) but has exactly the same parameter
  shapes, so the counts agree: 42,500,160 (torchvision ResNet-101 without
  its fc) + 4 * (3*3*2048*21 + 21) = 42,500,160 + 1,548,372 = 44,048,532
  parameters with 21 classes. We keep torchvision's layout so ImageNet
  weights import by a table. The Caffe model fine-tunes with BatchNorm
  frozen (``use_global_stats``), hence ``frozen_bn=True`` by default.
* ``deeplabv2_vgg16``: the VGG-16 "DeepLab form" of `flaxseg.models.vgg`
  (pool4 and pool5 3x3 stride 1, conv5 dilation 2) and, per branch, fc6 (3x3,
  dilation r, 1024) -> ReLU -> dropout -> fc7 (1x1, 1024) -> ReLU -> dropout
  -> fc8 (1x1, num_classes), the Caffe ``fc{6,7,8}_{1..4}``.

Multi-scale inputs (sec. 4.1, "MSC"): with ``multi_scale_inputs=(1.0, 0.75,
0.5)`` the same network (shared weights) runs on the input rescaled by each
factor, each score map is bilinearly resized to the score-map size of the
scale-1 input, and the maps are fused by their elementwise maximum. The fused
map gives ``logits``; ``aux['scale_logits']`` holds each scale's own logits,
upsampled to the input size, in the order of `multi_scale_inputs`. The paper
trains with a cross-entropy loss on each scale's output and on the fused
output; a trainer reproduces that with::

  loss = ce(logits) + sum(ce(s) for s in aux['scale_logits'])

(Caffe compares each scale's map with a label downsampled to that map's size;
here every output is at input resolution, so the full label is used). The
default trainer reads only ``logits`` and ``aux['aux_logits']`` and ignores
these keys, i.e. it trains the fused output only. A rescaled input is
``floor((size - 1) * scale) + 1`` pixels per side (Caffe's ``Interp`` layer:
321 -> 241 -> 161), resized like every other resize here with the corner
convention `align_corners` (True, as Caffe's ``Interp``). With trainable
BatchNorm (``frozen_bn=False``) each scale's pass updates the running
statistics in turn; the paper's ResNet keeps BatchNorm frozen.

Parameter names (Caffe names on the right)::

  backbone/...                    ResNet (see resnet.py) or VGG (see vgg.py)
  aspp_branch{k}/{kernel,bias}    fc1_voc12_c{k}          (ResNet-101)
  aspp_branch{k}/fc{6,7,8}/...    fc{6,7,8}_{k+1}         (VGG-16)

``aux`` holds:

  logits_stride8        float32 (N, h, w, num_classes): the summed (and,
                        with multi-scale inputs, fused) scores before
                        upsampling, at the backbone's output stride (8 by
                        default, hence the name; 41x41 for a 321x321 input).
  scale_logits          only with `multi_scale_inputs`: tuple of float32
                        (N, H, W, num_classes), one per scale.
  scale_logits_stride8  only with `multi_scale_inputs`: tuple of each scale's
                        scores resized to the size of ``logits_stride8``
                        (whose elementwise maximum is ``logits_stride8``).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models import resnet, vgg
from flaxseg.models.aspp import scale_rates
from flaxseg.models.layers import (canonicalize_dtype, conv_kernel_init,
                                   resize_bilinear)

Array = jax.Array

#: ASPP rates at output stride 8 (sec. 3.3 and table 3).
ASPP_RATES = {'L': (6, 12, 18, 24), 'S': (2, 4, 8, 12)}
#: The output stride the rates above are defined at.
NATIVE_STRIDE = 8
#: Multi-scale input factors of the paper (sec. 4.1).
PAPER_SCALES = (1.0, 0.75, 0.5)
#: Caffe's initialisation of the class-score layers (gaussian, std 0.01).
score_kernel_init = nn.initializers.normal(0.01)


def scaled_size(size: int, scale: float) -> int:
  """Side of an input rescaled by `scale`, as Caffe's ``Interp`` layer.

  Args:
    size: side in pixels.
    scale: factor, e.g. 0.75.

  Returns:
    ``floor((size - 1) * scale) + 1``: 321 -> 241 at 0.75 and 161 at 0.5,
    both again of the form 8k + 1 that keeps the stride-8 grid on input
    pixels.
  """
  return int(math.floor((size - 1) * scale + 1e-9)) + 1


class VGGBranch(nn.Module):
  """One VGG-16 ASPP branch: fc6 (3x3 atrous), fc7, fc8 (sec. 3.3, fig. 4b).

  Attributes:
    num_classes: output classes (fc8).
    rate: atrous rate of fc6.
    width: channels of fc6 and fc7 (1024 in the paper).
    dropout: dropout rate after fc6 and fc7 (0.5 in the Caffe model).
    dtype: computation dtype; parameters stay float32.
  """
  num_classes: int
  rate: int
  width: int = 1024
  dropout: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """Computes the branch's class scores.

    Args:
      x: pool5 features (N, h, w, C).
      train: dropout on (needs the ``'dropout'`` rng).

    Returns:
      (N, h, w, num_classes) scores in `dtype`.
    """
    dtype = canonicalize_dtype(self.dtype)
    r = self.rate
    y = nn.Conv(self.width, (3, 3), padding=((r, r), (r, r)),
                kernel_dilation=(r, r), dtype=dtype,
                kernel_init=conv_kernel_init, name='fc6')(x)
    y = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(y))
    y = nn.Conv(self.width, (1, 1), padding='VALID', dtype=dtype,
                kernel_init=conv_kernel_init, name='fc7')(y)
    y = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(y))
    return nn.Conv(self.num_classes, (1, 1), padding='VALID', dtype=dtype,
                   kernel_init=score_kernel_init, name='fc8')(y)


class DeepLabV2(nn.Module):
  """Backbone + v2 ASPP (summed class scores), bilinear upsampling.

  Attributes:
    num_classes: output classes.
    backbone: 'resnet' or 'vgg16'.
    depth: ResNet depth (101 in the paper).
    base_width: ResNet stem width (64; smaller for tiny models).
    width_multiplier: VGG channel multiplier (1.0; smaller for tiny models).
    output_stride: 8 (paper); 16 and 32 are accepted where the backbone
      supports them.
    aspp_rates: atrous rate of each branch at `output_stride`.
    fc_width: channels of fc6 / fc7 of the VGG branches (1024), before
      `width_multiplier`.
    dropout: dropout rate after fc6 and fc7 of the VGG branches.
    pool5a: VGG only: DeepLab-LargeFOV's 3x3 stride-1 average pool after
      pool5 (no parameters).
    multi_scale_inputs: input scale factors for multi-scale fusion (sec.
      4.1), containing 1.0; None for a single scale.
    bn_momentum: Flax BatchNorm momentum (ResNet).
    bn_axis_name: axis name for synchronised BatchNorm, or None.
    frozen_bn: use `FrozenBatchNorm` in the ResNet (Caffe DeepLab v2).
    dtype: computation dtype; parameters stay float32, logits are float32.
    align_corners: corner convention of every bilinear resize (True: Caffe's
      ``Interp`` layer).
    scan_blocks: scan over the backbone's repeated residual blocks
      (`resnet.ResNet.scan_blocks`; same parameters and results; for
      TPU/GPU compile time, much slower on XLA:CPU).
  """
  num_classes: int
  backbone: str = 'resnet'
  depth: int = 101
  base_width: int = 64
  width_multiplier: float = 1.0
  output_stride: int = NATIVE_STRIDE
  aspp_rates: Tuple[int, ...] = ASPP_RATES['L']
  fc_width: int = 1024
  dropout: float = 0.5
  pool5a: bool = False
  multi_scale_inputs: Optional[Tuple[float, ...]] = None
  bn_momentum: float = 0.9
  bn_axis_name: Optional[str] = None
  frozen_bn: bool = True
  dtype: Any = jnp.float32
  align_corners: bool = True
  scan_blocks: bool = False

  def _features(self, dtype) -> nn.Module:
    """The backbone module; its last feature map feeds the branches."""
    if self.backbone == 'resnet':
      return resnet.ResNet(
          depth=self.depth, base_width=self.base_width,
          output_stride=self.output_stride, bn_momentum=self.bn_momentum,
          bn_axis_name=self.bn_axis_name, frozen_bn=self.frozen_bn,
          dtype=dtype, scan_blocks=self.scan_blocks, name='backbone')
    if self.backbone == 'vgg16':
      return vgg.VGG16(style='deeplab', width_multiplier=self.width_multiplier,
                       pool5a=self.pool5a, include_fc=False, dtype=dtype,
                       name='backbone')
    raise ValueError(f"backbone={self.backbone!r}: expected 'resnet' or "
                     "'vgg16'")

  @nn.compact
  def __call__(self, x: Array, train: bool = False
               ) -> Tuple[Array, Dict[str, Any]]:
    """Segments a batch of images.

    Args:
      x: normalised images (N, H, W, 3), any H and W.
      train: batch statistics with ``batch_stats`` updates (unless
        `frozen_bn`; pass ``mutable=['batch_stats']``) and, for VGG, dropout
        (``'dropout'`` rng).

    Returns:
      ``(logits, aux)``: float32 logits (N, H, W, num_classes) and a dict
      with ``'logits_stride8'`` and, with `multi_scale_inputs`,
      ``'scale_logits'`` and ``'scale_logits_stride8'`` (see the module
      docstring).
    """
    dtype = canonicalize_dtype(self.dtype)
    height, width = x.shape[1:3]
    backbone = self._features(dtype)
    if self.backbone == 'resnet':
      # One atrous conv per branch straight to class scores (Caffe
      # fc1_voc12_c{k}).
      branches = [
          nn.Conv(self.num_classes, (3, 3), padding=((r, r), (r, r)),
                  kernel_dilation=(r, r), dtype=dtype,
                  kernel_init=score_kernel_init, name=f'aspp_branch{k}')
          for k, r in enumerate(self.aspp_rates)]
      last = 'layer4'
    else:
      branches = [
          VGGBranch(self.num_classes, r,
                    width=vgg.scale_width(self.fc_width,
                                          self.width_multiplier),
                    dropout=self.dropout, dtype=dtype,
                    name=f'aspp_branch{k}')
          for k, r in enumerate(self.aspp_rates)]
      last = 'pool5a' if self.pool5a else 'pool5'

    def scores(images):
      feats = backbone(images, train)[last]
      outs = [b(feats, train) if isinstance(b, VGGBranch) else b(feats)
              for b in branches]
      # Sum in float32: the branches' scores are added, not concatenated.
      return sum(o.astype(jnp.float32) for o in outs)

    aux = {}
    if self.multi_scale_inputs is None:
      low = scores(x)
    else:
      per_scale = {}
      for s in self.multi_scale_inputs:
        size = (scaled_size(height, s), scaled_size(width, s))
        xs = resize_bilinear(x, size, align_corners=self.align_corners)
        per_scale[s] = scores(xs)
      ref_size = per_scale[1.0].shape[1:3]
      resized = tuple(
          resize_bilinear(per_scale[s], ref_size,
                          align_corners=self.align_corners)
          for s in self.multi_scale_inputs)
      low = resized[0]
      for r in resized[1:]:
        low = jnp.maximum(low, r)
      aux['scale_logits_stride8'] = resized
      aux['scale_logits'] = tuple(
          resize_bilinear(per_scale[s], (height, width),
                          align_corners=self.align_corners)
          for s in self.multi_scale_inputs)
    aux['logits_stride8'] = low
    logits = resize_bilinear(low, (height, width),
                             align_corners=self.align_corners)
    return logits, aux


def _positive_int(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f'{name}={value!r} must be a positive integer')
  return value


def _build(backbone: str, args: Dict[str, Any]) -> DeepLabV2:
  """Validates constructor arguments and builds the module."""
  num_classes = _positive_int('num_classes', args['num_classes'])
  output_stride = args['output_stride']
  aspp = args['aspp']
  if aspp not in ASPP_RATES:
    raise ValueError(f"aspp={aspp!r} is not an ASPP variant; expected 'L' "
                     "(rates 6, 12, 18, 24) or 'S' (2, 4, 8, 12)")
  rates = args['aspp_rates']
  if rates is None:
    rates = scale_rates(ASPP_RATES[aspp], NATIVE_STRIDE, output_stride)
  try:
    rates = tuple(int(r) for r in rates)
  except (TypeError, ValueError) as e:
    raise ValueError(f'aspp_rates={args["aspp_rates"]!r} must be four '
                     'positive integers') from e
  if len(rates) != 4 or min(rates) < 1:
    raise ValueError(f'aspp_rates={args["aspp_rates"]!r} must be four '
                     'positive integers (one per ASPP branch)')
  scales = args['multi_scale_inputs']
  if scales is not None:
    try:
      scales = tuple(float(s) for s in scales)
    except (TypeError, ValueError) as e:
      raise ValueError(f'multi_scale_inputs={args["multi_scale_inputs"]!r} '
                       'must be a sequence of positive numbers') from e
    if (1.0 not in scales or min(scales) <= 0
        or len(set(scales)) != len(scales)):
      raise ValueError(f'multi_scale_inputs={args["multi_scale_inputs"]!r} '
                       'must be distinct positive scales including 1.0 '
                       '(the fused map has the size of the scale-1 map)')
  common = dict(
      num_classes=num_classes, output_stride=output_stride,
      aspp_rates=rates, multi_scale_inputs=scales,
      bn_momentum=args['bn_momentum'], bn_axis_name=args['bn_axis_name'],
      frozen_bn=bool(args['frozen_bn']),
      dtype=canonicalize_dtype(args['dtype']),
      align_corners=bool(args['align_corners']))
  if backbone == 'resnet':
    resnet.validate_config(101, output_stride, None, args['base_width'])
    return DeepLabV2(backbone='resnet', depth=101,
                     base_width=args['base_width'],
                     scan_blocks=bool(args['scan_blocks']), **common)
  if output_stride != NATIVE_STRIDE:
    raise ValueError(f'output_stride={output_stride!r} is not supported by '
                     'the VGG-16 DeepLab form (pool4/pool5 stride 1); '
                     'expected 8')
  multiplier = float(args['width_multiplier'])
  vgg.validate_vgg('deeplab', multiplier, 1, 3, 1, 'SAME',
                   float(args['dropout']))
  return DeepLabV2(backbone='vgg16', width_multiplier=multiplier,
                   fc_width=_positive_int('fc_width', args['fc_width']),
                   dropout=float(args['dropout']),
                   pool5a=bool(args['pool5a']), **common)


def deeplabv2_resnet101(*, num_classes: int, dtype: Any = 'float32',
                        output_stride: int = 8, aspp: str = 'L',
                        aspp_rates: Optional[Sequence[int]] = None,
                        multi_scale_inputs: Optional[Sequence[float]] = None,
                        bn_momentum: float = 0.9,
                        bn_axis_name: Optional[str] = None,
                        frozen_bn: bool = True, base_width: int = 64,
                        align_corners: bool = True,
                        scan_blocks: bool = False) -> DeepLabV2:
  """DeepLab v2 on ResNet-101 (sec. 3.3, 4.1; 44,048,532 params, 21 classes).

  Args:
    num_classes: output classes.
    dtype: computation dtype ('float32', 'bfloat16' or a jnp dtype).
    output_stride: 8 (paper), 16 or 32; the rates are rescaled from 8.
    aspp: 'L' (rates 6, 12, 18, 24) or 'S' (2, 4, 8, 12).
    aspp_rates: four rates at `output_stride`, overriding `aspp`'s.
    multi_scale_inputs: e.g. (1.0, 0.75, 0.5) for max fusion over scales
      (sec. 4.1); None for one scale.
    bn_momentum: Flax BatchNorm momentum (0.9 = PyTorch's 0.1).
    bn_axis_name: axis name for synchronised BatchNorm, or None.
    frozen_bn: freeze every BatchNorm (the Caffe model's fine-tuning).
    base_width: ResNet stem width (shrink for tiny models).
    align_corners: corner convention of the resizes (True: Caffe).
    scan_blocks: run repeated residual blocks as one ``jax.lax.scan``
      (`resnet.ResNet.scan_blocks`: same parameters and results; for
      TPU/GPU compile time, much slower on XLA:CPU).

  Returns:
    A `DeepLabV2` module.
  """
  return _build('resnet', dict(locals()))


def deeplabv2_vgg16(*, num_classes: int, dtype: Any = 'float32',
                    output_stride: int = 8, aspp: str = 'L',
                    aspp_rates: Optional[Sequence[int]] = None,
                    multi_scale_inputs: Optional[Sequence[float]] = None,
                    width_multiplier: float = 1.0, fc_width: int = 1024,
                    dropout: float = 0.5, pool5a: bool = False,
                    bn_momentum: float = 0.9,
                    bn_axis_name: Optional[str] = None,
                    frozen_bn: bool = True,
                    align_corners: bool = True) -> DeepLabV2:
  """DeepLab v2 on VGG-16 (sec. 3.3, fig. 4; 37,877,652 params, 21 classes).

  14,714,688 parameters in the 13 conv layers plus, per branch, fc6
  3*3*512*1024 + 1024, fc7 1024*1024 + 1024 and fc8 1024*21 + 21, i.e.
  4 * 5,790,741 = 23,162,964 for ASPP's four branches.

  Args:
    num_classes: output classes.
    dtype: computation dtype ('float32', 'bfloat16' or a jnp dtype).
    output_stride: must be 8 (the DeepLab form of VGG-16).
    aspp: 'L' (rates 6, 12, 18, 24) or 'S' (2, 4, 8, 12).
    aspp_rates: four fc6 rates, overriding `aspp`'s.
    multi_scale_inputs: e.g. (1.0, 0.75, 0.5) for max fusion over scales
      (sec. 4.1); None for one scale.
    width_multiplier: scales every VGG and fc6/fc7 channel count (shrink for
      tiny models).
    fc_width: fc6 / fc7 channels at width 1.0 (1024).
    dropout: dropout rate after fc6 and fc7 (0.5).
    pool5a: add DeepLab-LargeFOV's 3x3 average pool after pool5.
    bn_momentum, bn_axis_name, frozen_bn: accepted like every model's; VGG-16
      has no BatchNorm, so they change nothing.
    align_corners: corner convention of the resizes (True: Caffe).

  Returns:
    A `DeepLabV2` module.
  """
  return _build('vgg16', dict(locals()))
