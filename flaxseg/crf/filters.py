"""Gaussian message-passing filters for the fully connected CRF.

Mean-field inference in the dense CRF of Krähenbühl & Koltun ("Efficient
Inference in Fully Connected CRFs with Gaussian Edge Potentials", NIPS 2011)
needs, for every kernel and label ``l``, the Gaussian-filtered belief

    m_i(l) = sum_j k(f_i, f_j) Q_j(l),    k(f_i, f_j) = exp(-|f_i - f_j|^2 / 2),

with features scaled by their bandwidths exactly as pydensecrf builds them
(``DenseCRF2D::addPairwiseGaussian`` / ``addPairwiseBilateral``):

    smoothness:  f_i = (x_i / sxy, y_i / sxy)
    appearance:  f_i = (x_i / sxy, y_i / sxy, r_i / srgb, g_i / srgb, b_i / srgb)

(``x`` the column, ``y`` the row, colours in the 0..255 range).

Self term. The NIPS paper writes the message as a sum over ``j != i``.
pydensecrf's source (``pairwise.cpp``, ``DenseKernel::filter``) applies the
permutohedral lattice as is and subtracts nothing, so its message *includes*
the ``j == i`` term (approximately, through the lattice). Every filter here
takes ``include_self``: ``True`` (the default) is pydensecrf's behaviour,
``False`` the paper's ``j != i`` sum (the full sum minus ``values_i``).

Normalisation (``pairwise.cpp``, ``DenseKernel::initLattice`` and ``filter``):

* ``'none'`` (pydensecrf ``NO_NORMALIZATION``): ``m = K v``. pydensecrf
  computes a mean norm in this mode but never applies it.
* ``'symmetric'`` (pydensecrf ``NORMALIZE_SYMMETRIC``, its default):
  ``n_i = 1 / sqrt(d_i + 1e-20)`` with ``d = K 1`` the filter response of a
  constant-one image *including* the self term (what the lattice returns), and
  ``m = n * K(n * v)`` (``n`` applied before and after filtering). When
  ``include_self=False`` the inner ``K`` loses its diagonal but ``d`` keeps it,
  i.e. ``d_i = (sum_{j != i} k_ij) + 1``, so ``d_i >= 1`` and ``n`` is finite.
* ``'after'`` (pydensecrf ``NORMALIZE_AFTER``; what CRF-as-RNN's Caffe layer
  does, ``multi_stage_meanfield.cpp``): ``m = (K v) / (d + 1e-20)``, a
  weighted mean of the neighbours' values.

Each backend computes ``d`` with its own filter, so the normalisation is
consistent with the kernel it actually applies.

Backends (all pure ``jnp``/``lax``, batched over a leading axis, usable under
``jit``/``vmap``/``pmap`` and differentiable by plain autodiff):

* :func:`exact_filter`: the O(N^2) dense Gaussian filter; the test oracle.
* :func:`window_filter`: the ConvCRF approximation (Teichmann & Cipolla,
  "Convolutional CRFs for Semantic Segmentation", BMVC 2019 / arXiv 2018):
  ``k(i, j)`` is truncated to a ``window_size x window_size`` neighbourhood
  of ``i`` (exact inside the window, zero outside), optionally on a grid
  downsampled by ``downsample`` (sum-pooled values, mean-pooled features,
  bilinear upsampling of the result).
* :func:`separable_spatial_filter`: the smoothness (position-only) kernel is
  separable, ``exp(-|p_i - p_j|^2 / 2 sxy^2) = k_y(y_i, y_j) k_x(x_i, x_j)``, so
  it is applied *exactly* as two dense 1-D matrix products, O(N (H + W)).
* ``permutohedral`` (Adams et al., Eurographics 2010, as used by pydensecrf)
  is not implemented here; see ``flaxseg.crf.meanfield``.

Masks (padded batches). Evaluation pads images to one size; the padding must
not take part in the CRF. With a ``mask`` (1 on real pixels, 0 on padding),
:func:`normalized` filters ``mask * v`` and computes the norm from
``K mask``, so on the real pixels the messages are exactly those of the
image cropped to them (``K`` restricted to real pixels), and padded pixels
receive zero messages. The lattice cannot drop points, so the features of
padded pixels are moved out of reach first (:func:`separate_masked`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

#: Added to the filtered ones image before the inverse square root, as in
#: pydensecrf's ``initLattice``.
NORM_EPS = 1e-20

NORMALIZATIONS = ('none', 'symmetric', 'after')


def position_features(height: int, width: int, sxy: float, dtype=jnp.float32):
  """Scaled pixel positions ``(x / sxy, y / sxy)``, pydensecrf's feature order.

  Args:
    height, width: image size.
    sxy: spatial bandwidth in pixels.
    dtype: output dtype.

  Returns:
    ``[height, width, 2]`` array.
  """
  y, x = jnp.meshgrid(jnp.arange(height, dtype=dtype),
                      jnp.arange(width, dtype=dtype), indexing='ij')
  return jnp.stack([x, y], axis=-1) / jnp.asarray(sxy, dtype)


def bilateral_features(image, sxy: float, srgb: float):
  """Scaled ``(x, y, r, g, b)`` features of the appearance kernel.

  Args:
    image: ``[B, H, W, 3]`` colours in the 0..255 range (any float dtype).
    sxy: spatial bandwidth in pixels.
    srgb: colour bandwidth in 0..255 intensity units.

  Returns:
    ``[B, H, W, 5]`` array in ``image``'s float dtype.
  """
  image = jnp.asarray(image)
  if image.ndim != 4 or image.shape[-1] != 3:
    raise ValueError(f'image must be [B, H, W, 3], got shape {image.shape}')
  dtype = image.dtype if jnp.issubdtype(image.dtype, jnp.floating) else jnp.float32
  b, h, w, _ = image.shape
  pos = jnp.broadcast_to(position_features(h, w, sxy, dtype), (b, h, w, 2))
  return jnp.concatenate([pos, image.astype(dtype) / jnp.asarray(srgb, dtype)],
                         axis=-1)


def exact_filter(features, values, *, include_self: bool = True):
  """Dense Gaussian filter ``m_i = sum_j exp(-|f_i - f_j|^2 / 2) v_j``.

  O(N^2) time and memory in the number of pixels ``N = H * W``: the oracle
  for the approximate backends, for small images only.

  Args:
    features: ``[B, H, W, D]`` bandwidth-scaled features.
    values: ``[B, H, W, C]`` values to filter (beliefs, or ones).
    include_self: keep the ``j == i`` term (pydensecrf) or drop it (the paper).

  Returns:
    ``[B, H, W, C]`` filtered values.
  """
  b, h, w, d = features.shape
  c = values.shape[-1]
  f = features.reshape(b, h * w, d)
  # Accumulating the squared distance one feature at a time keeps memory at
  # O(N^2) (not O(N^2 D)) and avoids the cancellation of |a|^2+|b|^2-2ab.
  sq = jnp.zeros((b, h * w, h * w), features.dtype)
  for k in range(d):
    diff = f[:, :, None, k] - f[:, None, :, k]
    sq = sq + diff * diff
  kernel = jnp.exp(-0.5 * sq)
  if not include_self:
    kernel = kernel * (1.0 - jnp.eye(h * w, dtype=kernel.dtype))
  out = jnp.einsum('bij,bjc->bic', kernel, values.reshape(b, h * w, c),
                   precision=lax.Precision.HIGHEST)
  return out.reshape(b, h, w, c)


#: Gap, in bandwidth-scaled feature units, that :func:`separate_masked` puts
#: between real and masked pixels: exp(-16^2 / 2) underflows to 0, and
#: permutohedral vertices (and blur neighbours) of points this far apart never
#: coincide (they lie within about 2.5 (d+1) elevated units of their point,
#: and a feature-0 gap g moves the elevated coordinates by g (d+1) / sqrt(3),
#: so g > 4.5 sqrt(3) ~ 7.8 already suffices).
SEPARATION = 16.0


def separate_masked(features, mask):
  """Moves masked-out pixels' features to one point beyond every real pixel.

  Every pixel where ``mask`` is 0 gets the same feature vector: feature 0
  (the scaled column ``x / sxy``) is ``SEPARATION`` beyond the batch's largest,
  the others are the batch's smallest. Every masked point is then at least
  ``SEPARATION`` away from every real one, so a permutohedral lattice built on
  all points has, around the real points, exactly the vertices and blur
  neighbours of a lattice built on the real points alone; collapsing the
  masked points adds only ``d + 1`` vertices and widens the key range by
  ``SEPARATION`` only.

  Args:
    features: ``[B, H, W, D]`` bandwidth-scaled features.
    mask: ``[B, H, W, 1]`` (or broadcastable), 1 on real pixels, 0 elsewhere.

  Returns:
    ``[B, H, W, D]`` features.
  """
  lowest = jnp.min(features, axis=(0, 1, 2))
  far = jnp.max(features[..., 0]) + jnp.asarray(SEPARATION, features.dtype)
  point = lowest.at[0].set(far)
  return jnp.where(mask > 0, features, point)


def _window_filter_full_res(features, values, window_size: int,
                            include_self: bool):
  """Truncated-window Gaussian filter at the input resolution."""
  b, h, w, d = features.shape
  c = values.shape[-1]
  r = window_size // 2
  # Offsets beyond the image never hit a pixel: clamp so a huge window stays
  # cheap and "window covering the image" is exactly the dense filter.
  # Symbolic sizes (a shape-polymorphic export) keep the full radius.
  rh = min(r, h - 1) if isinstance(h, int) else r
  rw = min(r, w - 1) if isinstance(w, int) else r
  pad = ((0, 0), (rh, rh), (rw, rw), (0, 0))
  fp = jnp.pad(features, pad)
  vp = jnp.pad(values, pad)
  # Zero-padded values alone would still let padded features enter the
  # kernel; the mask makes out-of-image neighbours contribute exactly zero.
  mp = jnp.pad(jnp.ones((b, h, w, 1), values.dtype), pad)
  offsets = [(dy, dx) for dy in range(-rh, rh + 1) for dx in range(-rw, rw + 1)
             if include_self or (dy, dx) != (0, 0)]
  offsets = jnp.asarray(offsets, jnp.int32)

  def body(acc, off):
    # dynamic_slice wants one index dtype (a Python 0 is int64 under x64).
    zero = jnp.zeros((), off.dtype)
    start = (zero, off[0] + rh, off[1] + rw, zero)
    fs = lax.dynamic_slice(fp, start, (b, h, w, d))
    vs = lax.dynamic_slice(vp, start, (b, h, w, c))
    ms = lax.dynamic_slice(mp, start, (b, h, w, 1))
    k = jnp.exp(-0.5 * jnp.sum(jnp.square(features - fs), -1, keepdims=True))
    return acc + (k * ms) * vs, None

  # A scan over offsets keeps compile time independent of the window size.
  out, _ = lax.scan(body, jnp.zeros_like(values), offsets)
  return out


def window_filter(features, values, *, window_size: int = 11,
                  include_self: bool = True, downsample: int = 1, mask=None):
  """ConvCRF truncated-window Gaussian filter (Teichmann & Cipolla 2018).

  ``m_i = sum_{j in W(i)} exp(-|f_i - f_j|^2 / 2) v_j`` with ``W(i)`` the
  ``window_size x window_size`` square around pixel ``i`` (clipped to the
  image). A window of ``2 * max(H, W) - 1`` or more equals
  :func:`exact_filter`.

  With ``downsample = s > 1`` the image is padded to a multiple of ``s`` and
  split into ``s x s`` cells; each cell gets the summed values and the mean
  features of its real pixels (its feature is its centre position and mean
  colour), the window filter runs on the cell grid (``window_size`` counted in
  cells), and the result is upsampled bilinearly. Each cell stands for all its
  pixels, so the result approximates the full-resolution sum (not a mean).
  ``include_self=False`` then subtracts ``v_i`` at full resolution.

  Args:
    features: ``[B, H, W, D]`` bandwidth-scaled features.
    values: ``[B, H, W, C]`` values to filter.
    window_size: odd window side, in (downsampled) pixels.
    include_self: keep the ``j == i`` term.
    downsample: integer downsampling factor ``s >= 1``.
    mask: optional ``[B, H, W, 1]``, 1 on real pixels: with ``downsample >
      1`` a cell's feature is the mean over its real pixels only (values
      are expected to be masked by the caller). At full resolution the mask
      is not needed (masked values contribute nothing). Near the border of
      the mask the downsampled result still differs from that of the
      cropped image (the bilinear upsampling sees the empty cells beyond).

  Returns:
    ``[B, H, W, C]`` filtered values.
  """
  if window_size < 1 or window_size % 2 != 1:
    raise ValueError(f'window_size must be a positive odd integer, got {window_size}')
  if downsample < 1 or int(downsample) != downsample:
    raise ValueError(f'downsample must be a positive integer, got {downsample}')
  if downsample == 1:
    return _window_filter_full_res(features, values, window_size, include_self)
  s = int(downsample)
  b, h, w, d = features.shape
  c = values.shape[-1]
  hp, wp = -(-h // s) * s, -(-w // s) * s
  pad = ((0, 0), (0, hp - h), (0, wp - w), (0, 0))

  def pool_sum(x):
    x = jnp.pad(x, pad)
    return x.reshape(b, hp // s, s, wp // s, s, x.shape[-1]).sum(axis=(2, 4))

  if mask is None:
    # Padding is < s, so every cell holds at least one real pixel.
    f_low = pool_sum(features) / pool_sum(jnp.ones((b, h, w, 1), features.dtype))
  else:
    # Cells wholly outside the mask hold zero values; their features are
    # irrelevant (any finite value), so the count is clamped at 1.
    real = jnp.broadcast_to(mask, (b, h, w, 1)).astype(features.dtype)
    f_low = pool_sum(features * real) / jnp.maximum(pool_sum(real), 1.0)
  v_low = pool_sum(values)
  out_low = _window_filter_full_res(f_low, v_low, window_size, True)
  out = jax.image.resize(out_low, (b, hp, wp, c), method='bilinear')[:, :h, :w]
  return out if include_self else out - values


def _axis_kernel(n: int, sxy: float, dtype):
  """Dense 1-D Gaussian matrix ``exp(-(a - b)^2 / (2 sxy^2))`` over ``n``."""
  p = jnp.arange(n, dtype=dtype) / jnp.asarray(sxy, dtype)
  return jnp.exp(-0.5 * jnp.square(p[:, None] - p[None, :]))


def separable_spatial_filter(values, sxy: float, *, include_self: bool = True):
  """Exact position-only Gaussian filter as two 1-D passes.

  Equals ``exact_filter(position_features(H, W, sxy), values)`` because
  ``exp(-|p_i - p_j|^2 / 2 sxy^2)`` factors over rows and columns; no
  truncation, O(N (H + W)) time.

  Args:
    values: ``[B, H, W, C]`` values to filter.
    sxy: spatial bandwidth in pixels.
    include_self: keep the ``j == i`` term (the kernel's diagonal is 1).

  Returns:
    ``[B, H, W, C]`` filtered values.
  """
  _, h, w, _ = values.shape
  ky = _axis_kernel(h, sxy, values.dtype)
  kx = _axis_kernel(w, sxy, values.dtype)
  out = jnp.einsum('ij,bjwc->biwc', ky, values, precision=lax.Precision.HIGHEST)
  out = jnp.einsum('kw,biwc->bikc', kx, out, precision=lax.Precision.HIGHEST)
  return out if include_self else out - values


def normalized(filter_fn: Callable, values_shape, dtype, normalization: str,
               include_self: bool = True, mask=None) -> Callable:
  """Wraps a filter with pydensecrf's normalisation, norms computed once.

  Args:
    filter_fn: ``filter_fn(values, include_self) -> filtered``, one of the
      backends above with its features/bandwidths bound.
    values_shape: ``[B, H, W, C]`` shape the returned function will take
      (only ``B, H, W`` matter for the norms).
    dtype: float dtype of the norms.
    normalization: ``'none'``, ``'symmetric'`` or ``'after'`` (see the module
      docstring).
    include_self: passed to ``filter_fn`` for the messages; the norm always
      uses the full sum ``K 1`` (self included), as pydensecrf does.
    mask: optional ``[B, H, W]`` or ``[B, H, W, 1]``, nonzero on the pixels
      that take part (see the module docstring): values are masked before
      filtering, messages after, and the norm is ``K mask``. ``None``: all.

  Returns:
    ``fn(values) -> messages`` with the same shape as ``values``.
  """
  if normalization not in NORMALIZATIONS:
    raise ValueError(f'normalization must be one of {NORMALIZATIONS}, '
                     f'got {normalization!r}')
  b, h, w = values_shape[:3]
  if mask is not None:
    mask = as_mask(mask, (b, h, w), dtype)
  if normalization == 'none':
    if mask is None:
      return lambda v: filter_fn(v, include_self)
    return lambda v: mask * filter_fn(mask * v, include_self)
  ones = jnp.ones((b, h, w, 1), dtype) if mask is None else mask
  degree = filter_fn(ones, True) + NORM_EPS
  norm = lax.rsqrt(degree) if normalization == 'symmetric' else 1.0 / degree
  if mask is not None:
    # Zero (not 1 / eps) outside the mask: masks values and messages.
    norm = jnp.where(mask > 0, norm, 0.0)
  if normalization == 'symmetric':
    return lambda v: norm * filter_fn(norm * v, include_self)
  if mask is None:
    return lambda v: norm * filter_fn(v, include_self)
  return lambda v: norm * filter_fn(mask * v, include_self)


def as_mask(mask, shape, dtype):
  """``mask`` as a ``[B, H, W, 1]`` array of 0/1 in ``dtype``.

  Args:
    mask: ``[B, H, W]`` or ``[B, H, W, 1]``, bool or numeric (nonzero: in).
    shape: the expected ``(B, H, W)``.
    dtype: float dtype of the result.

  Returns:
    ``[B, H, W, 1]`` array.
  """
  mask = jnp.asarray(mask)
  if mask.ndim == 3:
    mask = mask[..., None]
  if mask.shape != tuple(shape) + (1,):
    raise ValueError(f'mask must be [B, H, W] = {list(shape)}, got shape '
                     f'{mask.shape}')
  return (mask != 0).astype(dtype)
