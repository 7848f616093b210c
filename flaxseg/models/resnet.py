"""ResNet backbones (He et al., 2016) with atrous output strides.

Layout and parameter names follow torchvision's ``resnet*`` so weights import
by a table: ``conv1``, ``bn1`` (7x7/2 stem), a 3x3/2 max pool, then
``layer{1..4}_block{i}`` with ``conv1 bn1 conv2 bn2 [conv3 bn3]`` and, where
torchvision has a downsample, ``downsample_conv downsample_bn``. Bottleneck
blocks stride on the 3x3 convolution ("ResNet v1.5", as torchvision). The
fully connected classifier is omitted: these are segmentation backbones.

Output stride 16 or 8 replaces the stride of layer4 (and layer3) by dilation
exactly like torchvision's ``replace_stride_with_dilation``: the first block
of a dilated stage keeps the previous dilation, later blocks use the new one.
``multi_grid`` (DeepLab v3, Chen et al. 2017, sec. 3.2) multiplies the rate of
every layer4 block, first included, by unit rates such as (1, 2, 4).
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.layers import (ModuleDef, canonicalize_dtype,
                                   computed_once, conv_kernel_init,
                                   conv_module, make_norm)

Array = jax.Array

#: Blocks per stage for each depth (He et al. 2016, table 1).
STAGE_SIZES = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
#: Output strides and the stages (layer2, layer3, layer4) whose stride becomes
#: dilation, as torchvision's ``replace_stride_with_dilation``.
DILATE_STAGES = {
    32: (False, False, False),
    16: (False, False, True),
    8: (False, True, True),
}


def is_bottleneck(depth: int) -> bool:
  """Whether `depth` uses Bottleneck blocks (expansion 4) or BasicBlocks."""
  return depth >= 50


def validate_config(depth: int, output_stride: int,
                    multi_grid: Optional[Sequence[int]] = None,
                    base_width: int = 64) -> None:
  """Raises ValueError for an unsupported ResNet configuration.

  Args:
    depth: ResNet depth.
    output_stride: ratio of input to layer4 resolution.
    multi_grid: unit rates for layer4, or None.
    base_width: channels of the stem.
  """
  if depth not in STAGE_SIZES:
    raise ValueError(f'depth={depth!r} is not supported; expected one of '
                     f'{sorted(STAGE_SIZES)}')
  if output_stride not in DILATE_STAGES:
    raise ValueError(f'output_stride={output_stride!r} is not supported; '
                     f'expected one of {sorted(DILATE_STAGES)}')
  if multi_grid is not None and (
      len(multi_grid) == 0 or any(int(u) < 1 for u in multi_grid)):
    raise ValueError(f'multi_grid={multi_grid!r} must be a non-empty sequence '
                     'of positive integers, or None')
  if not isinstance(base_width, int) or base_width < 1:
    raise ValueError(f'base_width={base_width!r} must be a positive integer')


def block_plan(depth: int, output_stride: int = 32,
               multi_grid: Optional[Sequence[int]] = None
               ) -> List[List[Tuple[int, int]]]:
  """The (stride, dilation) of the 3x3 convolution(s) of every block.

  Reproduces torchvision's ``ResNet._make_layer`` bookkeeping: a stage that is
  dilated gets stride 1 and multiplies the running dilation by 2; its first
  block uses the dilation before that multiplication. With `multi_grid`, block
  ``i`` of layer4 uses ``stage_rate * multi_grid[i % len(multi_grid)]``.

  Args:
    depth: ResNet depth (18, 34, 50, 101 or 152).
    output_stride: 8, 16 or 32.
    multi_grid: unit rates for layer4 (DeepLab v3 sec. 3.2), or None.

  Returns:
    One list per stage (layer1..layer4) of ``(stride, dilation)`` pairs.
  """
  validate_config(depth, output_stride, multi_grid)
  dilate = (False,) + DILATE_STAGES[output_stride]
  dilation = 1
  plan = []
  for stage, num_blocks in enumerate(STAGE_SIZES[depth]):
    stride = 1 if stage == 0 else 2
    previous = dilation
    if dilate[stage]:
      dilation *= stride
      stride = 1
    blocks = [(stride, previous)] + [(1, dilation)] * (num_blocks - 1)
    if stage == 3 and multi_grid is not None:
      blocks = [(s, dilation * int(multi_grid[i % len(multi_grid)]))
                for i, (s, _) in enumerate(blocks)]
    plan.append(blocks)
  return plan


def _pad(dilation: int, kernel: int = 3):
  p = dilation * (kernel - 1) // 2
  return ((p, p), (p, p))


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with an identity or projection shortcut.

  torchvision's BasicBlock (which refuses dilation > 1); here both 3x3
  convolutions use the block's dilation, padding = dilation.

  Attributes:
    planes: output channels.
    stride: stride of the first 3x3 convolution.
    dilation: dilation of both 3x3 convolutions.
    downsample: whether the shortcut is a 1x1 conv + BN projection.
    conv: convolution constructor.
    norm: normalisation constructor (see `make_norm`).
  """
  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  expansion = 1

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    ura = not train
    d = self.dilation
    y = self.conv(self.planes, (3, 3), (self.stride, self.stride),
                  padding=_pad(d), kernel_dilation=(d, d), name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y, use_running_average=ura))
    y = self.conv(self.planes, (3, 3), padding=_pad(d), kernel_dilation=(d, d),
                  name='conv2')(y)
    y = self.norm(name='bn2')(y, use_running_average=ura)
    if self.downsample:
      x = self.conv(self.planes, (1, 1), (self.stride, self.stride),
                    padding='VALID', name='downsample_conv')(x)
      x = self.norm(name='downsample_bn')(x, use_running_average=ura)
    return computed_once(nn.relu(x + y))


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided, dilated), 1x1 expand by 4, plus shortcut.

  Attributes:
    planes: channels of the 3x3 convolution; output has ``4 * planes``.
    stride: stride of the 3x3 convolution (torchvision / ResNet v1.5).
    dilation: dilation of the 3x3 convolution, padding = dilation.
    downsample: whether the shortcut is a 1x1 conv + BN projection.
    conv: convolution constructor.
    norm: normalisation constructor (see `make_norm`).
  """
  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  expansion = 4

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    ura = not train
    d = self.dilation
    y = self.conv(self.planes, (1, 1), padding='VALID', name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y, use_running_average=ura))
    y = self.conv(self.planes, (3, 3), (self.stride, self.stride),
                  padding=_pad(d), kernel_dilation=(d, d), name='conv2')(y)
    y = nn.relu(self.norm(name='bn2')(y, use_running_average=ura))
    y = self.conv(self.planes * 4, (1, 1), padding='VALID', name='conv3')(y)
    y = self.norm(name='bn3')(y, use_running_average=ura)
    if self.downsample:
      x = self.conv(self.planes * 4, (1, 1), (self.stride, self.stride),
                    padding='VALID', name='downsample_conv')(x)
      x = self.norm(name='downsample_bn')(x, use_running_average=ura)
    return computed_once(nn.relu(x + y))


class ResNet(nn.Module):
  """ResNet feature extractor in torchvision's layout.

  Attributes:
    depth: 18, 34 (BasicBlock), 50, 101, 152 (Bottleneck).
    base_width: stem channels; stage ``k`` has ``base_width * 2**k`` planes
      (64 in the paper; smaller for tiny test and demo models).
    output_stride: 32 (plain), 16 or 8 (strides replaced by dilation).
    multi_grid: unit rates for the layer4 blocks (DeepLab v3 sec. 3.2), e.g.
      (1, 2, 4); None keeps torchvision's rates.
    bn_momentum: Flax momentum (0.9 is PyTorch's 0.1).
    bn_axis_name: axis name for synchronised BatchNorm, or None.
    frozen_bn: use `FrozenBatchNorm` everywhere.
    dtype: computation dtype; parameters stay float32.
    remat: recompute each residual block's activations in the backward pass
      (``nn.remat``) instead of keeping them: less memory, one more forward.
      Parameter names do not change.
    conv_impl: 'xla' (`nn.Conv`), 'matmul' (`MatmulConv`, per-tap matmuls,
      faster on XLA:CPU), 'taps' (per-tap matmuls only) or 'auto' (matmul on
      CPU only); same parameters.
  """
  depth: int = 50
  base_width: int = 64
  output_stride: int = 32
  multi_grid: Optional[Tuple[int, ...]] = None
  bn_momentum: float = 0.9
  bn_axis_name: Optional[str] = None
  frozen_bn: bool = False
  dtype: Any = jnp.float32
  remat: bool = False
  conv_impl: str = 'xla'

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Dict[str, Array]:
    """Computes the feature pyramid.

    Args:
      x: images (N, H, W, 3).
      train: use batch statistics and update ``batch_stats``.

    Returns:
      Dict with ``'stem'`` (after conv1/bn1/relu, stride 2), ``'layer1'``
      (stride 4), ``'layer2'`` (8), ``'layer3'`` and ``'layer4'`` (16 and 32,
      or less with dilation), all in `dtype`.
    """
    validate_config(self.depth, self.output_stride, self.multi_grid,
                    self.base_width)
    dtype = canonicalize_dtype(self.dtype)
    conv = functools.partial(conv_module(self.conv_impl), use_bias=False,
                             dtype=dtype, kernel_init=conv_kernel_init)
    norm = make_norm(momentum=self.bn_momentum, axis_name=self.bn_axis_name,
                     frozen=self.frozen_bn, dtype=dtype)
    block_cls = Bottleneck if is_bottleneck(self.depth) else BasicBlock
    # `train` (argument 2, after self and x) is a Python bool: static.
    block = (nn.remat(block_cls, static_argnums=(2,)) if self.remat
             else block_cls)

    features = {}
    x = conv(self.base_width, (7, 7), (2, 2), padding=((3, 3), (3, 3)),
             name='conv1')(x)
    x = nn.relu(norm(name='bn1')(x, use_running_average=not train))
    features['stem'] = x
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    in_channels = self.base_width
    plan = block_plan(self.depth, self.output_stride, self.multi_grid)
    for stage, blocks in enumerate(plan):
      planes = self.base_width * 2**stage
      out_channels = planes * block_cls.expansion
      for i, (stride, dilation) in enumerate(blocks):
        # torchvision: a projection whenever the first block changes shape;
        # it stays even where dilation has replaced the stride.
        downsample = i == 0 and (stride != 1 or in_channels != out_channels)
        x = block(planes, stride=stride, dilation=dilation,
                  downsample=downsample, conv=conv, norm=norm,
                  name=f'layer{stage + 1}_block{i}')(x, train)
        in_channels = out_channels
      features[f'layer{stage + 1}'] = x
    return features
