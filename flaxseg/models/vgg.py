"""VGG-16 encoder (Simonyan & Zisserman, 2015) in the FCN and DeepLab forms.

`VGG16` is the configuration-D network of the paper: 13 3x3 convolutions with
bias and ReLU in five stages (64, 128, 256, 512, 512 channels), each stage
ending in a max pool, optionally followed by the "fully connected" layers
``fc6`` and ``fc7`` as convolutions with ReLU and dropout. Its 13 conv layers
hold 14,714,688 parameters, as torchvision's ``vgg16().features``.

Two forms (``style``):

* ``'fcn'`` (Long, Shelhamer & Darrell, CVPR 2015 / PAMI 2016, sec. 3.1 and
  4.1): 2x2 stride-2 max pools (output stride 32), ``fc6`` a 7x7 convolution
  with 4096 channels, ``fc7`` 1x1 with 4096, dropout 0.5 after each. The
  paper's Caffe net pads conv1_1 by 100 pixels (``conv1_padding=100``) and
  runs fc6 VALID; ``conv1_padding=1`` with ``fc6_padding='SAME'`` is the
  plain "same" layout.
* ``'deeplab'`` (Chen et al., ICLR 2015, sec. 3.1 and 4.1; the released
  ``DeepLab-LargeFOV`` prototxt): 3x3 max pools with pad 1, stride 2 for
  pool1-3 and stride 1 for pool4 and pool5 (output stride 8), conv5_x with
  dilation 2, optionally the prototxt's ``pool5a`` (3x3 stride-1 average pool,
  padding counted), then ``fc6`` (LargeFOV: 3x3, dilation 12, 1024 channels),
  ``fc7`` 1x1 1024, dropout 0.5 after each.

All pools are Caffe's ceil-mode pools (a last partial window is kept, but never
one starting in the padding), so any input size works; for 2x2/2 pools this is
``ceil(H / 2)``. With DeepLab's 3x3/2 pad-1 pools a 321 input gives a 41x41
stride-8 map (``(321 - 1) / 8 + 1``).

Stable interface (used by fcn.py, deeplab_v1.py and deeplab_v2.py): build
``VGG16(style=..., ...)`` and call ``features = vgg(x, train)``; the result is
a dict with ``'pool1'`` ... ``'pool5'`` (after each max pool, ReLU'd),
``'conv5'`` (conv5_3 after ReLU, before pool5), ``'pool5a'`` when enabled and,
when ``include_fc``, ``'fc6'`` and ``'fc7'`` (after ReLU and dropout). With
``include_fc=False`` nothing after pool5/pool5a exists (DeepLab v2's ASPP
builds its own fc6/fc7 per branch).

Parameter names, torchvision ``vgg16`` names on the right (each ``kernel`` is
the torch weight transposed from (out, in, kh, kw) to (kh, kw, in, out))::

  conv1_1  features.0     conv3_1  features.10    conv5_1  features.24
  conv1_2  features.2     conv3_2  features.12    conv5_2  features.26
  conv2_1  features.5     conv3_3  features.14    conv5_3  features.28
  conv2_2  features.7     conv4_1  features.17    fc6      classifier.0
                          conv4_2  features.19    fc7      classifier.3
                          conv4_3  features.21

``classifier.0`` is a Linear(25088, 4096): reshape its weight to
(4096, 512, 7, 7) first (the FCN form's 7x7 fc6). DeepLab's 3x3 dilated
1024-channel fc6 and 1024-channel fc7 are the paper's subsampled versions
(every 4th filter, spatially decimated, sec. 4.1).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Dict, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.layers import canonicalize_dtype, conv_kernel_init

Array = jax.Array

#: Output channels of the five stages and their number of 3x3 convolutions.
VGG16_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))

#: Our parameter name -> torchvision ``vgg16`` module name.
TORCHVISION_NAMES = {
    'conv1_1': 'features.0', 'conv1_2': 'features.2',
    'conv2_1': 'features.5', 'conv2_2': 'features.7',
    'conv3_1': 'features.10', 'conv3_2': 'features.12',
    'conv3_3': 'features.14',
    'conv4_1': 'features.17', 'conv4_2': 'features.19',
    'conv4_3': 'features.21',
    'conv5_1': 'features.24', 'conv5_2': 'features.26',
    'conv5_3': 'features.28',
    'fc6': 'classifier.0', 'fc7': 'classifier.3',
}

STYLES = ('fcn', 'deeplab')


def scale_width(channels: int, width_multiplier: float) -> int:
  """Channels of a layer under `width_multiplier` (at least 1).

  Args:
    channels: channels at width 1.0 (the paper).
    width_multiplier: positive factor.

  Returns:
    ``max(1, round(channels * width_multiplier))``.
  """
  return max(1, int(round(channels * width_multiplier)))


def caffe_max_pool(x: Array, window: int, stride: int, pad: int) -> Array:
  """Caffe's ceil-mode max pooling on NHWC input.

  Output size per spatial axis: ``ceil((H + 2 pad - window) / stride) + 1``,
  minus one when the last window would start inside the trailing padding
  (Caffe's ``PoolingLayer::Reshape``; also PyTorch's ``ceil_mode=True``).
  Padding never wins a max (it is -inf).

  Args:
    x: array (N, H, W, C).
    window: square window size.
    stride: stride.
    pad: symmetric padding.

  Returns:
    The pooled array.
  """
  pads, sizes = [], []
  for size in x.shape[1:3]:
    out = -(-(size + 2 * pad - window) // stride) + 1
    if pad > 0 and (out - 1) * stride >= size + pad:
      out -= 1
    high = max((out - 1) * stride + window - size - pad, 0)
    pads.append((pad, high))
    sizes.append(out)
  y = nn.max_pool(x, (window, window), strides=(stride, stride),
                  padding=tuple(pads))
  return y[:, :sizes[0], :sizes[1], :]


def validate_vgg(style: str, width_multiplier: float, conv1_padding: int,
                 fc6_kernel: int, fc6_dilation: int,
                 fc6_padding: Union[str, int], dropout: float) -> None:
  """Raises ValueError for an unsupported `VGG16` configuration.

  Args:
    style: 'fcn' or 'deeplab'.
    width_multiplier: positive channel factor.
    conv1_padding: padding of conv1_1 (>= 0).
    fc6_kernel: fc6 kernel size (>= 1).
    fc6_dilation: fc6 dilation (>= 1).
    fc6_padding: 'SAME', 'VALID' or a non-negative int.
    dropout: dropout rate in [0, 1).
  """
  if style not in STYLES:
    raise ValueError(f'style={style!r} must be one of {STYLES}')
  if not width_multiplier > 0:
    raise ValueError(f'width_multiplier={width_multiplier!r} must be > 0')
  if not isinstance(conv1_padding, int) or conv1_padding < 0:
    raise ValueError(f'conv1_padding={conv1_padding!r} must be an integer >= 0')
  if not isinstance(fc6_kernel, int) or fc6_kernel < 1:
    raise ValueError(f'fc6_kernel={fc6_kernel!r} must be a positive integer')
  if not isinstance(fc6_dilation, int) or fc6_dilation < 1:
    raise ValueError(f'fc6_dilation={fc6_dilation!r} must be a positive '
                     'integer')
  if not (fc6_padding in ('SAME', 'VALID') or (
      isinstance(fc6_padding, int) and fc6_padding >= 0)):
    raise ValueError(f"fc6_padding={fc6_padding!r} must be 'SAME', 'VALID' or "
                     'an integer >= 0')
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f'dropout={dropout!r} must be in [0, 1)')


class VGG16(nn.Module):
  """VGG-16 features (and fc6/fc7 as convolutions); see the module docstring.

  Attributes:
    style: 'fcn' (2x2/2 pools, output stride 32) or 'deeplab' (3x3 pad-1
      pools, pool4/pool5 stride 1, conv5 dilation 2, output stride 8).
    width_multiplier: scales every channel count (1.0 = paper).
    conv1_padding: padding of conv1_1 (1; the FCN paper net uses 100).
    pool5a: DeepLab-LargeFOV's 3x3 stride-1 average pool after pool5.
    include_fc: build fc6 and fc7.
    fc6_features: fc6 channels (4096 FCN, 1024 DeepLab-LargeFOV).
    fc6_kernel: fc6 kernel size (7 FCN, 3 DeepLab).
    fc6_dilation: fc6 dilation (1 FCN, 12 DeepLab-LargeFOV).
    fc6_padding: 'VALID' (FCN paper), 'SAME', or an int.
    fc7_features: fc7 channels (4096 FCN, 1024 DeepLab).
    dropout: rate after fc6 and after fc7 (0.5 in both papers).
    dtype: computation dtype; parameters stay float32.
  """
  style: str = 'fcn'
  width_multiplier: float = 1.0
  conv1_padding: int = 1
  pool5a: bool = False
  include_fc: bool = True
  fc6_features: int = 4096
  fc6_kernel: int = 7
  fc6_dilation: int = 1
  fc6_padding: Union[str, int] = 'VALID'
  fc7_features: int = 4096
  dropout: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Dict[str, Array]:
    """Computes the VGG-16 features.

    Args:
      x: normalised images (N, H, W, 3).
      train: apply dropout after fc6 and fc7 (``'dropout'`` rng).

    Returns:
      Dict of features in `dtype`: ``'pool1'`` ... ``'pool5'``, ``'conv5'``,
      ``'pool5a'`` (if enabled), ``'fc6'`` and ``'fc7'`` (if `include_fc`).
    """
    validate_vgg(self.style, self.width_multiplier, self.conv1_padding,
                 self.fc6_kernel, self.fc6_dilation, self.fc6_padding,
                 self.dropout)
    dtype = canonicalize_dtype(self.dtype)
    conv = functools.partial(nn.Conv, use_bias=True, dtype=dtype,
                             kernel_init=conv_kernel_init)
    width = functools.partial(scale_width,
                              width_multiplier=self.width_multiplier)
    deeplab = self.style == 'deeplab'
    features = {}
    x = x.astype(dtype)
    for stage, (channels, num_convs) in enumerate(VGG16_STAGES, start=1):
      # DeepLab keeps stride 8 after pool3 and dilates conv5 by 2 so its
      # field of view matches the pretrained net (DeepLab v1 sec. 3.1).
      d = 2 if deeplab and stage == 5 else 1
      for i in range(1, num_convs + 1):
        p = self.conv1_padding if (stage, i) == (1, 1) else d
        x = conv(width(channels), (3, 3), padding=((p, p), (p, p)),
                 kernel_dilation=(d, d), name=f'conv{stage}_{i}')(x)
        x = nn.relu(x)
      if stage == 5:
        features['conv5'] = x
      if deeplab:
        x = caffe_max_pool(x, 3, 2 if stage <= 3 else 1, 1)
      else:
        x = caffe_max_pool(x, 2, 2, 0)
      features[f'pool{stage}'] = x
    if self.pool5a:
      # Caffe AVE pooling divides by the full window, padding included.
      x = nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                      count_include_pad=True)
      features['pool5a'] = x
    if not self.include_fc:
      return features

    k, d = self.fc6_kernel, self.fc6_dilation
    padding = self.fc6_padding
    if isinstance(padding, int):
      padding = ((padding, padding), (padding, padding))
    elif padding == 'SAME':
      # Explicit, symmetric padding: identical to Caffe's pad = d (k - 1) / 2
      # for odd kernels (Flax 'SAME' would put an odd extra row at the end).
      lo = d * (k - 1) // 2
      hi = d * (k - 1) - lo
      padding = ((lo, hi), (lo, hi))
    x = conv(width(self.fc6_features), (k, k), padding=padding,
             kernel_dilation=(d, d), name='fc6')(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(x))
    features['fc6'] = x
    x = conv(width(self.fc7_features), (1, 1), padding='VALID', name='fc7')(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(x))
    features['fc7'] = x
    return features


def output_size(size: int, style: str = 'fcn', conv1_padding: int = 1
                ) -> Tuple[int, ...]:
  """Spatial sizes after pool1 ... pool5 for an input side of `size`.

  Args:
    size: input height or width.
    style: 'fcn' or 'deeplab'.
    conv1_padding: conv1_1 padding (adds ``2 * (conv1_padding - 1)``).

  Returns:
    The five pooled sizes, following Caffe's ceil-mode rule.
  """
  sizes = []
  s = size + 2 * (conv1_padding - 1)
  for stage in range(1, 6):
    if style == 'deeplab':
      k, stride, pad = 3, (2 if stage <= 3 else 1), 1
    else:
      k, stride, pad = 2, 2, 0
    out = math.ceil((s + 2 * pad - k) / stride) + 1
    if pad > 0 and (out - 1) * stride >= s + pad:
      out -= 1
    s = out
    sizes.append(s)
  return tuple(sizes)
