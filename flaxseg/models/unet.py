"""U-Net (Ronneberger, Fischer and Brox, MICCAI 2015, "U-Net: Convolutional
Networks for Biomedical Image Segmentation").

Two models:

* `UNetOriginal` (``unet_original``), the network of sec. 2 and fig. 1: a
  contracting path of 5 levels, each two unpadded 3x3 convolutions with bias
  + ReLU, 2x2 max pooling (stride 2) between levels, channels 64, 128, 256,
  512, 1024; an expansive path of 4 levels, each a 2x2 up-convolution
  (transposed, stride 2) halving the channels, concatenation with the
  centre-cropped feature map of the same contracting level, and two unpadded
  3x3 convolutions + ReLU; a final 1x1 convolution to the classes. Dropout
  0.5 at the end of the contracting path (sec. 3.1; applied to the outputs of
  the two deepest levels, as in the released Caffe model). Weights are drawn
  from a Gaussian with std ``sqrt(2 / N)``, N the fan-in (sec. 3). With 1
  input channel and 2 classes it has 31,030,658 parameters; input channels
  are taken from the images.

  Because every convolution is unpadded, a tile of ``16 k + 124`` pixels
  maps to ``16 k - 60`` output pixels (572 -> 388 in fig. 1), output pixel
  ``i`` sitting on input pixel ``i + 92``. To return logits at the input size
  for any input, the model uses the paper's overlap-tile strategy (sec. 2,
  fig. 2): the image is extended by mirroring, 92 pixels before it and
  enough after it that the valid output covers the whole image, and the
  output is cropped to the image. With ``overlap_tile=False`` the module is
  the raw valid network, which only accepts the sizes ``16 k + 124``.

* `UNet` (``unet``), the practical variant most reimplementations train:
  padded 3x3 convolutions without bias, each followed by BatchNorm + ReLU,
  configurable `depth` (number of poolings, 4 in the paper) and `base_width`
  (64), upsampling by 2x2 transposed convolutions (the paper) or bilinearly.
  Any input size works without padding the image: pooling rounds odd sizes
  up (a ceil-mode max pool), and each expansive level crops the upsampled map
  to the size of its skip features (transposed) or resizes to it (bilinear).

Parameter names (``i`` the level, 0 = full resolution, ``depth`` the bottom;
``j`` = 1, 2)::

  enc{i}_conv{j}           contracting path (UNet: and enc{i}_bn{j})
  dec{i}_upconv            up-convolution from level i + 1 to level i
                           (absent in UNet with bilinear upsampling)
  dec{i}_conv{j}           expansive path (UNet: and dec{i}_bn{j})
  classifier               final 1x1 convolution, with bias
"""

from __future__ import annotations

import functools
import math
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.layers import (canonicalize_dtype, conv_kernel_init,
                                   make_norm, resize_bilinear)

Array = jax.Array

#: Poolings of the original network (fig. 1).
ORIGINAL_DEPTH = 4
#: Pixels lost on each side from input to output of the original network.
ORIGINAL_BORDER = 92
#: Weight init of the paper (sec. 3): Gaussian, std sqrt(2 / fan_in).
paper_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')
UPSAMPLE_MODES = ('transposed', 'bilinear')


def valid_output_size(size: int) -> int:
  """Output size of the raw valid original U-Net for input `size`.

  Args:
    size: input height or width.

  Returns:
    ``size - 184``.

  Raises:
    ValueError: if `size` is not of the form ``16 k + 124`` with k >= 4
      (some level would pool an odd map or shrink to nothing).
  """
  k, rem = divmod(size - 124, 16)
  if rem or k < 4:
    raise ValueError(f'input size {size} is not valid for the unpadded U-Net: '
                     'expected 16 k + 124 with k >= 4 (188, 204, ..., 572)')
  return size - 2 * ORIGINAL_BORDER


def tile_size(size: int) -> int:
  """Smallest valid input tile whose valid output covers `size` pixels.

  Args:
    size: height or width of the image to segment.

  Returns:
    ``16 k + 124`` for the smallest k >= 4 with ``16 k - 60 >= size``.
  """
  k = max(4, math.ceil((size + 60) / 16))
  return 16 * k + 124


def _center_crop(x: Array, size: Tuple[int, int]) -> Array:
  top = (x.shape[1] - size[0]) // 2
  left = (x.shape[2] - size[1]) // 2
  return x[:, top:top + size[0], left:left + size[1]]


class UNetOriginal(nn.Module):
  """The unpadded U-Net of the paper, with overlap-tile inference.

  Attributes:
    num_classes: output classes (2 in the paper).
    base_width: channels of the first level (64); level i has
      ``base_width * 2**i``.
    dropout: dropout rate at the end of the contracting path (0.5).
    overlap_tile: mirror-extend the input and crop the output so logits have
      the input size; False gives the raw valid network.
    dtype: computation dtype; parameters stay float32, logits are float32.
  """
  num_classes: int
  base_width: int = 64
  dropout: float = 0.5
  overlap_tile: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False
               ) -> Tuple[Array, Dict[str, Array]]:
    """Segments a batch of images.

    Args:
      x: normalised images (N, H, W, C), any C; any H and W with
        `overlap_tile`, else H and W of the form ``16 k + 124``.
      train: dropout on (``'dropout'`` rng).

    Returns:
      ``(logits, {})``: float32 logits (N, H, W, num_classes), or
      (N, H - 184, W - 184, num_classes) without `overlap_tile`.
    """
    dtype = canonicalize_dtype(self.dtype)
    height, width = x.shape[1:3]
    if self.overlap_tile:
      pads = [(ORIGINAL_BORDER, tile_size(s) - s - ORIGINAL_BORDER)
              for s in (height, width)]
      # Mirroring without repeating the edge needs 2 pixels; a 1-pixel side
      # is repeated instead. jnp.pad reflects repeatedly for pads > size.
      mode = 'reflect' if min(height, width) > 1 else 'symmetric'
      x = jnp.pad(x, [(0, 0)] + pads + [(0, 0)], mode=mode)
    else:
      valid_output_size(height)
      valid_output_size(width)
    conv = functools.partial(nn.Conv, kernel_size=(3, 3), padding='VALID',
                             dtype=dtype, kernel_init=paper_kernel_init)
    drop = nn.Dropout(self.dropout, deterministic=not train)

    y = x.astype(dtype)
    skips = []
    for i in range(ORIGINAL_DEPTH + 1):
      if i:
        y = nn.max_pool(y, (2, 2), strides=(2, 2))
      for j in (1, 2):
        y = nn.relu(conv(self.base_width * 2**i, name=f'enc{i}_conv{j}')(y))
      if i >= ORIGINAL_DEPTH - 1:
        y = drop(y)
      skips.append(y)
    for i in reversed(range(ORIGINAL_DEPTH)):
      features = self.base_width * 2**i
      y = nn.ConvTranspose(features, (2, 2), strides=(2, 2), padding='VALID',
                           dtype=dtype, kernel_init=paper_kernel_init,
                           name=f'dec{i}_upconv')(y)
      y = jnp.concatenate([_center_crop(skips[i], y.shape[1:3]), y], axis=-1)
      for j in (1, 2):
        y = nn.relu(conv(features, name=f'dec{i}_conv{j}')(y))
    logits = nn.Conv(self.num_classes, (1, 1), dtype=dtype,
                     kernel_init=paper_kernel_init, name='classifier')(y)
    logits = logits.astype(jnp.float32)
    if self.overlap_tile:
      logits = logits[:, :height, :width]
    return logits, {}


class UNet(nn.Module):
  """Padded U-Net with BatchNorm for inputs of any size.

  Attributes:
    num_classes: output classes.
    depth: number of poolings (4 in the paper); the bottom level has output
      stride ``2**depth``.
    base_width: channels of the first level (64); level i has
      ``base_width * 2**i``.
    upsample: 'transposed' (2x2 up-convolution halving the channels, the
      paper) or 'bilinear' (no parameters; the concatenation then carries
      the deeper level's channels).
    dropout: dropout rate at the bottom of the network.
    bn_momentum: Flax BatchNorm momentum (0.9 = PyTorch's 0.1).
    bn_axis_name: axis name for synchronised BatchNorm, or None.
    frozen_bn: use `FrozenBatchNorm` for every BatchNorm.
    dtype: computation dtype; parameters stay float32, logits are float32.
  """
  num_classes: int
  depth: int = ORIGINAL_DEPTH
  base_width: int = 64
  upsample: str = 'transposed'
  dropout: float = 0.0
  bn_momentum: float = 0.9
  bn_axis_name: Optional[str] = None
  frozen_bn: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False
               ) -> Tuple[Array, Dict[str, Array]]:
    """Segments a batch of images.

    Args:
      x: normalised images (N, H, W, C), any size and channels.
      train: batch statistics with ``batch_stats`` updates (pass
        ``mutable=['batch_stats']``) and dropout (``'dropout'`` rng).

    Returns:
      ``(logits, {})``: float32 logits (N, H, W, num_classes).
    """
    dtype = canonicalize_dtype(self.dtype)
    conv = functools.partial(nn.Conv, kernel_size=(3, 3),
                             padding=((1, 1), (1, 1)), use_bias=False,
                             dtype=dtype, kernel_init=conv_kernel_init)
    norm = make_norm(momentum=self.bn_momentum, axis_name=self.bn_axis_name,
                     frozen=self.frozen_bn, dtype=dtype)

    def double_conv(y, features, prefix):
      for j in (1, 2):
        y = conv(features, name=f'{prefix}_conv{j}')(y)
        y = nn.relu(norm(name=f'{prefix}_bn{j}')(
            y, use_running_average=not train))
      return y

    y = x.astype(dtype)
    skips = []
    for i in range(self.depth + 1):
      if i:
        # Ceil mode: odd sizes are padded (with -inf) rather than truncated.
        pad = ((0, y.shape[1] % 2), (0, y.shape[2] % 2))
        y = nn.max_pool(y, (2, 2), strides=(2, 2), padding=pad)
      y = double_conv(y, self.base_width * 2**i, f'enc{i}')
      skips.append(y)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    for i in reversed(range(self.depth)):
      size = skips[i].shape[1:3]
      if self.upsample == 'transposed':
        y = nn.ConvTranspose(self.base_width * 2**i, (2, 2), strides=(2, 2),
                             padding='VALID', dtype=dtype,
                             kernel_init=conv_kernel_init,
                             name=f'dec{i}_upconv')(y)
        y = y[:, :size[0], :size[1]]  # 2 * ceil(s / 2) >= s
      else:
        y = resize_bilinear(y, size)
      y = jnp.concatenate([skips[i], y], axis=-1)
      y = double_conv(y, self.base_width * 2**i, f'dec{i}')
    logits = nn.Conv(self.num_classes, (1, 1), dtype=dtype,
                     kernel_init=conv_kernel_init, name='classifier')(y)
    return logits.astype(jnp.float32), {}


def _positive_int(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f'{name}={value!r} must be a positive integer')
  return value


def _rate(name: str, value: Any) -> float:
  if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
    raise ValueError(f'{name}={value!r} must be a rate in [0, 1)')
  return float(value)


def _resolve_depth(depth: Optional[int], output_stride: Optional[int]) -> int:
  """The number of poolings from `depth` and/or `output_stride`."""
  if depth is not None:
    depth = _positive_int('depth', depth)
  if output_stride is not None:
    stride = _positive_int('output_stride', output_stride)
    if stride < 2 or stride & (stride - 1):
      raise ValueError(f'output_stride={output_stride!r} must be a power of '
                       'two >= 2 (2**depth for a U-Net)')
    from_stride = stride.bit_length() - 1
    if depth is not None and depth != from_stride:
      raise ValueError(f'output_stride={output_stride!r} and depth={depth!r} '
                       f'disagree: a U-Net of depth {depth} has output stride '
                       f'{2**depth}')
    depth = from_stride
  return ORIGINAL_DEPTH if depth is None else depth


def unet_original(*, num_classes: int, dtype: Any = 'float32',
                  base_width: int = 64, dropout: float = 0.5,
                  overlap_tile: bool = True,
                  output_stride: Optional[int] = None,
                  bn_momentum: float = 0.9,
                  bn_axis_name: Optional[str] = None,
                  frozen_bn: bool = False) -> UNetOriginal:
  """The unpadded U-Net of the paper (fig. 1) with overlap-tile inference.

  Args:
    num_classes: output classes (2 in the paper).
    dtype: computation dtype ('float32', 'bfloat16' or a jnp dtype).
    base_width: channels of the first level (64; shrink for tiny models).
    dropout: dropout rate at the end of the contracting path (0.5).
    overlap_tile: logits at the input size for any input (True), or the raw
      valid network (False: inputs of size 16 k + 124, outputs 184 smaller).
    output_stride: None or 16 (the network pools 4 times); accepted so
      every registered model takes the common arguments.
    bn_momentum: no effect (the original has no BatchNorm); accepted so
      every registered model takes the common arguments.
    bn_axis_name: no effect, as `bn_momentum`.
    frozen_bn: must be False: there is no BatchNorm to freeze.

  Returns:
    A `UNetOriginal` module.

  Raises:
    ValueError: naming the offending argument.
  """
  del bn_momentum, bn_axis_name  # No BatchNorm in the original network.
  if output_stride is not None and output_stride != 2**ORIGINAL_DEPTH:
    raise ValueError(f'output_stride={output_stride!r} is not supported: the '
                     f'original U-Net has output stride {2**ORIGINAL_DEPTH}')
  if frozen_bn:
    raise ValueError('frozen_bn=True is not supported: the original U-Net '
                     'has no BatchNorm')
  return UNetOriginal(
      num_classes=_positive_int('num_classes', num_classes),
      base_width=_positive_int('base_width', base_width),
      dropout=_rate('dropout', dropout), overlap_tile=bool(overlap_tile),
      dtype=canonicalize_dtype(dtype))


def unet(*, num_classes: int, dtype: Any = 'float32',
         depth: Optional[int] = None, output_stride: Optional[int] = None,
         base_width: int = 64, upsample: str = 'transposed',
         dropout: float = 0.0, bn_momentum: float = 0.9,
         bn_axis_name: Optional[str] = None,
         frozen_bn: bool = False) -> UNet:
  """Padded U-Net with BatchNorm, any input size.

  Args:
    num_classes: output classes.
    dtype: computation dtype ('float32', 'bfloat16' or a jnp dtype).
    depth: number of poolings (default 4, as the paper).
    output_stride: alternatively ``2**depth``; if both are given they must
      agree.
    base_width: channels of the first level (64).
    upsample: 'transposed' (paper) or 'bilinear'.
    dropout: dropout rate at the bottom of the network.
    bn_momentum: Flax BatchNorm momentum (0.9 = PyTorch's 0.1).
    bn_axis_name: axis name for synchronised BatchNorm, or None.
    frozen_bn: freeze every BatchNorm.

  Returns:
    A `UNet` module.

  Raises:
    ValueError: naming the offending argument.
  """
  if upsample not in UPSAMPLE_MODES:
    raise ValueError(f'upsample={upsample!r} is not supported; expected one '
                     f'of {UPSAMPLE_MODES}')
  return UNet(
      num_classes=_positive_int('num_classes', num_classes),
      depth=_resolve_depth(depth, output_stride),
      base_width=_positive_int('base_width', base_width), upsample=upsample,
      dropout=_rate('dropout', dropout), bn_momentum=bn_momentum,
      bn_axis_name=bn_axis_name, frozen_bn=bool(frozen_bn),
      dtype=canonicalize_dtype(dtype))
