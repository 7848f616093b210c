"""Fully convolutional networks FCN-32s, FCN-16s and FCN-8s on VGG-16.

Long, Shelhamer & Darrell, "Fully Convolutional Networks for Semantic
Segmentation" (CVPR 2015; PAMI 2016). The VGG-16 classifier becomes
convolutions (fc6 7x7 4096, fc7 1x1 4096, dropout 0.5; `vgg.VGG16` in its
'fcn' form) and a 1x1 ``score_fr`` predicts class scores at stride 32
(sec. 3.1, 4.1). Upsampling is in-network, by transposed convolutions without
bias initialised to bilinear interpolation (sec. 3.3); the coarse scores are
fused by summation with 1x1 scores of pool4 and pool3 (sec. 4.2):

* FCN-32s: ``upscore`` 64x64 stride 32 on score_fr.
* FCN-16s: ``upscore2`` (4x4/2) on score_fr + ``score_pool4``, then
  ``upscore16`` (32x32/16).
* FCN-8s: ``upscore2`` + ``score_pool4``, ``upscore_pool4`` (4x4/2) +
  ``score_pool3``, then ``upscore8`` (16x16/8).

The score layers are zero-initialised (sec. 4.2: the skips start as no-ops;
the paper found random initialisation no better). PAMI sec. 4.1: "the final
layer deconvolutional filters are fixed to bilinear interpolation, while
intermediate upsampling layers are initialized to bilinear interpolation and
then learned": the final upsampling's gradient is stopped unless
``learn_final_upsampling``; recipes also give it an LR multiplier of 0 so weight
decay leaves it alone. The transposed convolutions are full class-to-class
(C x C) kernels with bilinear filters on the diagonal, as Caffe's
``surgery.interp``, so they count ``k * k * C * C`` parameters each.

Two alignment schemes (``padding``):

* ``'paper'``: the released Caffe nets. conv1_1 pads by 100, fc6 is VALID and
  each fusion crops (Caffe ``Crop`` layers); the offsets follow from the
  layers' coordinate maps: score_pool4c 5, score_pool3c 9, final 31 (8s),
  27 (16s), 19 (32s). Works for any input size.
* ``'same'``: plain padding (conv1_1 pad 1, fc6 SAME); each upsampling output
  is cropped by ``stride / 2`` (the half-pixel alignment of a k = 2s
  transposed convolution) and to the skip's / input's size.

Offsets are computed, not tabulated (`crop_offsets`), from the affine map
``input coordinate = a * feature index + b`` of each layer.

Parameter names::

  backbone/conv1_1 ... conv5_3, fc6, fc7   (vgg.py; torchvision vgg16 names)
  score_fr, score_pool4, score_pool3       (1x1 convs with bias)
  upscore | upscore2, upscore16 | upscore2, upscore_pool4, upscore8
                                           (``kernel`` (k, k, C, C), no bias)

Each upsampling ``kernel[i, j, c_in, c_out]`` is Caffe's / PyTorch's
deconvolution weight ``[c_in, c_out, i, j]`` (scatter semantics: input pixel
``p`` adds ``w[m]`` to output ``p * s + m``), without flipping.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxseg.models.layers import canonicalize_dtype
from flaxseg.models.vgg import VGG16, validate_vgg

Array = jax.Array

PADDINGS = ('paper', 'same')
STRIDES = (32, 16, 8)
#: conv1_1 padding of the paper's Caffe nets (sec. 4.1 / voc-fcn*/net.py).
PAPER_CONV1_PADDING = 100


def bilinear_kernel(kernel_size: int, channels: int) -> np.ndarray:
  """Bilinear-interpolation weights for a transposed convolution.

  Caffe FCN's ``surgery.upsample_filt`` filter, placed on the diagonal (each
  class upsamples itself; off-diagonal weights are zero).

  Args:
    kernel_size: side of the square kernel (2 * stride for an upsampling by
      ``stride``).
    channels: input = output channels.

  Returns:
    float32 array (kernel_size, kernel_size, channels, channels).
  """
  factor = (kernel_size + 1) // 2
  center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
  og = np.arange(kernel_size, dtype=np.float64)
  filt1d = 1 - np.abs(og - center) / factor
  filt = np.outer(filt1d, filt1d).astype(np.float32)
  weights = np.zeros((kernel_size, kernel_size, channels, channels),
                     np.float32)
  for c in range(channels):
    weights[:, :, c, c] = filt
  return weights


def _bilinear_init(key, shape, dtype=jnp.float32):
  del key
  assert shape[0] == shape[1] and shape[2] == shape[3], shape
  return jnp.asarray(bilinear_kernel(shape[0], shape[2]), dtype)


class Upsample(nn.Module):
  """Transposed convolution without bias, initialised to bilinear upsampling.

  Caffe ``Deconvolution`` semantics with pad 0: output size
  ``(H - 1) * stride + kernel``, input pixel ``p`` scattered to outputs
  ``p * stride + m`` with weight ``kernel[m]``.

  Attributes:
    stride: upsampling factor; the kernel is ``2 * stride``.
    frozen: stop the gradient to the kernel (bilinear stays fixed).
    dtype: computation dtype.
  """
  stride: int
  frozen: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k, s = 2 * self.stride, self.stride
    c = x.shape[-1]
    kernel = self.param('kernel', _bilinear_init, (k, k, c, c), jnp.float32)
    if self.frozen:
      kernel = jax.lax.stop_gradient(kernel)
    # A gather conv over the s-dilated input with the flipped kernel is the
    # scatter (Caffe/PyTorch) transposed convolution with the unflipped one.
    kernel = kernel[::-1, ::-1].astype(self.dtype)
    return jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel, window_strides=(1, 1),
        padding=((k - 1, k - 1), (k - 1, k - 1)), lhs_dilation=(s, s),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _vgg_maps(padding: str) -> Dict[str, Tuple[float, float]]:
  """Affine maps (a, b), input coordinate = a * index + b, of pool3..score_fr.

  Convolutions shift by ``(k - 1) / 2 - pad``; the 2x2/2 pools map index
  ``i`` to ``2 i + 0.5`` of their input.
  """
  conv1_pad = PAPER_CONV1_PADDING if padding == 'paper' else 1
  a, b = 1.0, 1.0 - conv1_pad
  maps = {}
  for stage in range(1, 6):
    a, b = 2 * a, b + 0.5 * a
    maps[f'pool{stage}'] = (a, b)
  fc6_shift = 3.0 if padding == 'paper' else 0.0  # 7x7 VALID vs SAME
  maps['score_fr'] = (a, b + a * fc6_shift)
  return maps


def _upsampled(mapping: Tuple[float, float], stride: int
               ) -> Tuple[float, float]:
  """Map of a k = 2s, stride-s transposed convolution's full output."""
  a, b = mapping
  return a / stride, b - a * (stride - 0.5) / stride


def _offset(value: float) -> int:
  if value != round(value):
    raise AssertionError(f'non-integer crop offset {value}')
  return int(round(value))


def crop_offsets(stride: int, padding: str) -> Dict[str, int]:
  """Crop offsets of every fusion, from the layers' coordinate maps.

  A positive ``'score_poolN'`` offset crops the skip scores (Caffe's
  ``score_poolNc``); a negative one crops the upsampled scores instead.
  ``'final'`` is where the input-sized window starts in the last upsampling.

  Args:
    stride: 32, 16 or 8 (FCN-32s/16s/8s).
    padding: 'paper' or 'same'.

  Returns:
    Dict of offsets, e.g. for FCN-8s 'paper' ``{'score_pool4': 5,
    'score_pool3': 9, 'final': 31}``.
  """
  maps = _vgg_maps(padding)
  offsets = {}
  current = maps['score_fr']
  skips = {32: (), 16: ('pool4',), 8: ('pool4', 'pool3')}[stride]
  for skip in skips:
    up = _upsampled(current, 2)
    a, b = maps[skip]
    offsets[f'score_{skip}'] = _offset((up[1] - b) / a)
    # The fused map keeps the coordinates of whichever side is uncropped.
    current = up if offsets[f'score_{skip}'] >= 0 else (a, b)
  final = _upsampled(current, current[0])
  offsets['final'] = _offset(-final[1])
  return offsets


def _fuse(up: Array, skip: Array, offset: int) -> Array:
  """Sums `skip` cropped at `offset` (or `up` at -offset) over the overlap."""
  su, ss = (0, offset) if offset >= 0 else (-offset, 0)
  h = min(up.shape[1] - su, skip.shape[1] - ss)
  w = min(up.shape[2] - su, skip.shape[2] - ss)
  if h < 1 or w < 1:
    raise ValueError(f'FCN fusion: empty overlap between {up.shape} and '
                     f'{skip.shape} at offset {offset}')
  return (up[:, su:su + h, su:su + w] + skip[:, ss:ss + h, ss:ss + w])


class FCN(nn.Module):
  """FCN-32s/16s/8s on VGG-16 (see the module docstring).

  Attributes:
    num_classes: output classes.
    stride: 32, 16 or 8 (the finest skip used).
    padding: 'paper' (pad 100, VALID fc6, Caffe crops) or 'same'.
    width_multiplier: scales every VGG channel count (1.0 = paper).
    dropout: rate after fc6 and fc7 (0.5).
    learn_final_upsampling: train the last transposed convolution (the paper
      keeps it fixed to bilinear).
    zero_init_scores: zero-initialise score_fr / score_pool4 / score_pool3.
    dtype: computation dtype; parameters stay float32, logits are float32.
  """
  num_classes: int
  stride: int = 8
  padding: str = 'paper'
  width_multiplier: float = 1.0
  dropout: float = 0.5
  learn_final_upsampling: bool = False
  zero_init_scores: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False
               ) -> Tuple[Array, Dict[str, Array]]:
    """Segments a batch of images.

    Args:
      x: normalised images (N, H, W, 3), any H and W.
      train: dropout on (``'dropout'`` rng).

    Returns:
      ``(logits, {})``: float32 logits (N, H, W, num_classes).
    """
    dtype = canonicalize_dtype(self.dtype)
    height, width = x.shape[1:3]
    paper = self.padding == 'paper'
    features = VGG16(
        style='fcn', width_multiplier=self.width_multiplier,
        conv1_padding=PAPER_CONV1_PADDING if paper else 1,
        fc6_padding='VALID' if paper else 'SAME', dropout=self.dropout,
        dtype=dtype, name='backbone')(x, train)
    score_init = (nn.initializers.zeros if self.zero_init_scores
                  else nn.initializers.lecun_normal())
    score = functools.partial(nn.Conv, self.num_classes, (1, 1),
                              padding='VALID', dtype=dtype,
                              kernel_init=score_init)
    offsets = crop_offsets(self.stride, self.padding)

    y = score(name='score_fr')(features['fc7'])
    if self.stride <= 16:
      y = Upsample(2, dtype=dtype, name='upscore2')(y)
      y = _fuse(y, score(name='score_pool4')(features['pool4']),
                offsets['score_pool4'])
    if self.stride == 8:
      y = Upsample(2, dtype=dtype, name='upscore_pool4')(y)
      y = _fuse(y, score(name='score_pool3')(features['pool3']),
                offsets['score_pool3'])
    name = {32: 'upscore', 16: 'upscore16', 8: 'upscore8'}[self.stride]
    y = Upsample(self.stride, frozen=not self.learn_final_upsampling,
                 dtype=dtype, name=name)(y)
    o = offsets['final']
    if y.shape[1] < o + height or y.shape[2] < o + width:
      raise ValueError(f'FCN: upsampled scores {y.shape[1:3]} do not cover '
                       f'the input {(height, width)} at offset {o}')
    return y[:, o:o + height, o:o + width].astype(jnp.float32), {}


def _build(stride: int, args: Dict[str, Any]) -> FCN:
  """Validates constructor arguments and builds the module."""
  num_classes = args['num_classes']
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f'num_classes={num_classes!r} must be a positive integer')
  if args['padding'] not in PADDINGS:
    raise ValueError(f'padding={args["padding"]!r} must be one of {PADDINGS}')
  validate_vgg('fcn', args['width_multiplier'], 1, 7, 1, 'SAME',
               args['dropout'])
  return FCN(num_classes=num_classes, stride=stride, padding=args['padding'],
             width_multiplier=float(args['width_multiplier']),
             dropout=float(args['dropout']),
             learn_final_upsampling=bool(args['learn_final_upsampling']),
             zero_init_scores=bool(args['zero_init_scores']),
             dtype=canonicalize_dtype(args['dtype']))


_DOC = """FCN-{stride}s on VGG-16 (Long et al. 2015), paper settings by default.

  Args:
    num_classes: output classes.
    dtype: computation dtype ('float32', 'bfloat16' or a jnp dtype).
    padding: 'paper' (conv1_1 pad 100, VALID fc6, Caffe crop offsets) or
      'same' (plain SAME padding, half-pixel aligned crops).
    width_multiplier: scales every VGG-16 channel count (1.0 = paper).
    dropout: dropout after fc6 and fc7 (0.5).
    learn_final_upsampling: train the final {stride}x upsampling (the paper
      fixes it to bilinear, PAMI sec. 4.1).
    zero_init_scores: zero-initialise the 1x1 score layers (sec. 4.2).
    bn_axis_name: ignored (no BatchNorm); the trainer passes it to every
      model.

  Returns:
    An `FCN` module.
  """


def _constructor(stride):
  def constructor(*, num_classes: int, dtype: Any = 'float32',
                  padding: str = 'paper', width_multiplier: float = 1.0,
                  dropout: float = 0.5, learn_final_upsampling: bool = False,
                  zero_init_scores: bool = True,
                  bn_axis_name: Optional[str] = None) -> FCN:
    del bn_axis_name  # no BatchNorm; accepted like every registry model
    return _build(stride, dict(locals()))
  constructor.__name__ = constructor.__qualname__ = f'fcn{stride}s'
  constructor.__doc__ = _DOC.format(stride=stride)
  return constructor


fcn32s = _constructor(32)
fcn16s = _constructor(16)
fcn8s = _constructor(8)
