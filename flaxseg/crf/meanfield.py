"""Mean-field inference in the fully connected (dense) CRF.

The CRF of Krähenbühl & Koltun ("Efficient Inference in Fully Connected CRFs
with Gaussian Edge Potentials", NIPS 2011) has the energy

    E(x) = sum_i psi_u(x_i) + sum_{i<j} mu(x_i, x_j) sum_k w_k k_k(f_i, f_j)

with an appearance (bilateral) kernel over ``(position / sxy, rgb / srgb)`` and
a smoothness kernel over ``position / sxy`` (see :mod:`flaxseg.crf.filters`).
Mean-field inference follows pydensecrf's ``DenseCRF::inference``
(lucasb-eyer/pydensecrf, ``densecrf/src/densecrf.cpp``) step by step:

    Q^0 = softmax(-U)
    Q^{t+1} = softmax(-U - sum_k P_k(Q^t))

where ``U = -log p`` is the unary (pydensecrf's ``unary_from_softmax``; from
logits, ``-U = logits`` up to a per-pixel constant that softmax ignores) and
``P_k`` is pydensecrf's ``PairwisePotential::apply``: the normalised Gaussian
filter ``m_k = Kn_k(Q)`` followed by the label compatibility

* Potts (``compatibility=None``): ``P_k = -w_k m_k``, exactly pydensecrf's
  ``PottsCompatibility(w).apply`` (``out = -w * Q``). It equals the textbook
  ``mu(l, l') = w [l != l']`` up to a per-pixel constant, so the explicit matrix
  ``w_k (1 - I)`` gives the same ``Q``.
* matrix ``mu`` (``[L, L]``): ``P_k(l) = w_k sum_l' mu[l, l'] m_k(l')``.
  pydensecrf's ``MatrixCompatibility`` first symmetrises ``0.5 (mu + mu^T)``;
  this function applies ``mu`` as given (CRF-as-RNN learns a general matrix),
  so pass a symmetric matrix for parity with pydensecrf.

Unlike pydensecrf, which gives each kernel its own compatibility object, one
``mu`` is shared by both kernels and each kernel carries its weight ``w_k``.

Defaults are pydensecrf's README example (``addPairwiseGaussian(sxy=3,
compat=3)``, ``addPairwiseBilateral(sxy=80, srgb=13, compat=10)``). DeepLab's
published CRF settings, for reference: v1 LargeFOV ``bi_w=4, bi_xy_std=121,
bi_rgb_std=5, pos_w=3, pos_xy_std=3``; v2 ResNet-101 ``bi_w=4, bi_xy_std=67,
bi_rgb_std=3, pos_w=3, pos_xy_std=1`` (Chen et al., TPAMI 2017), with 10
iterations.

Backends (one interface, ``backend=``):

* ``'exact'``: dense O(N^2) filtering for both kernels; the oracle.
* ``'window'``: ConvCRF (Teichmann & Cipolla 2018) truncated window for the
  appearance kernel (optionally downsampled); the smoothness kernel uses the
  exact separable filter, which is cheaper than a window and not truncated.
* ``'permutohedral'``: pydensecrf's permutohedral lattice
  (:mod:`flaxseg.crf.lattice`) for both kernels, built once per image and
  reused by every iteration; an approximation of the exact filter.

Padded batches (``mask=``): pixels outside the mask take no part; on the
pixels inside, the result is that of the image cropped to them (exactly for
``'exact'`` and for ``'window'`` at ``downsample=1``, up to float rounding
for ``'permutohedral'``, whose padded points are moved out of the lattice's
reach; see :mod:`flaxseg.crf.filters`). Pixels outside keep
``softmax(unary_logits)``.

Everything is a pure function of arrays: usable under ``jit``/``vmap``/``pmap``
(the batch axis is independent) and differentiable with ``jax.grad``. The
kernels' weights and bandwidths may be traced values (one compilation serves
a parameter search).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from flaxseg.crf import feature_grad
from flaxseg.crf import filters
from flaxseg.crf import lattice

BACKENDS = ('exact', 'window', 'permutohedral')


class GaussianKernel(NamedTuple):
  """Smoothness kernel ``w exp(-|p_i - p_j|^2 / 2 sxy^2)`` (pydensecrf defaults)."""
  sxy: float = 3.0
  weight: float = 3.0


class BilateralKernel(NamedTuple):
  """Appearance kernel ``w exp(-|p_i-p_j|^2/2 sxy^2 - |I_i-I_j|^2/2 srgb^2)``.

  Defaults are pydensecrf's README values; colours in the 0..255 range.
  """
  sxy: float = 80.0
  srgb: float = 13.0
  weight: float = 10.0


def logits_from_probabilities(probs, clip: float = 1e-5):
  """``-U`` for pydensecrf's ``unary_from_softmax``: ``log(clip(p, clip, 1))``.

  Args:
    probs: ``[..., L]`` class probabilities.
    clip: lower clip, pydensecrf's default ``1e-5``.

  Returns:
    ``log`` of the clipped probabilities, usable as ``unary_logits``.
  """
  return jnp.log(jnp.clip(probs, clip, 1.0))


def build_filters(image, num_labels: int, *, smoothness=GaussianKernel(),
                  appearance=BilateralKernel(), backend: str = 'exact',
                  window_size: int = 11, downsample: int = 1,
                  normalization: str = 'symmetric',
                  include_self: bool = True, dtype=jnp.float32, mask=None,
                  feature_gradients: bool = False):
  """The message functions of the enabled kernels, norms precomputed.

  Args:
    image: ``[B, H, W, 3]`` colours in the 0..255 range.
    num_labels: number of labels ``L`` (the filtered arrays' last axis).
    smoothness: a :class:`GaussianKernel`, or ``None`` to disable it.
    appearance: a :class:`BilateralKernel`, or ``None`` to disable it.
    backend: ``'exact'``, ``'window'`` or ``'permutohedral'``.
    window_size, downsample: the window backend's appearance-kernel window (odd
      side, in downsampled pixels) and downsampling factor.
    normalization: ``'none'``, ``'symmetric'`` (pydensecrf's default) or
      ``'after'`` (CRF-as-RNN's).
    include_self: keep the ``j == i`` term in the messages (pydensecrf does).
    dtype: float dtype of the features and norms.
    mask: optional ``[B, H, W]``, nonzero on the pixels that take part (e.g.
      the unpadded region of each image); ``None``: every pixel.
    feature_gradients: let gradients reach the kernels' bandwidths (and the
      image) through the permutohedral filter as well
      (:mod:`flaxseg.crf.feature_grad`); the exact and window filters are
      differentiable in their features anyway.

  Returns:
    ``(fns, weights)``: lists of ``fn(Q [B,H,W,L]) -> [B,H,W,L]`` and of the
    kernels' weights, in the order smoothness, appearance.
  """
  if backend not in BACKENDS:
    raise ValueError(f'backend must be one of {BACKENDS}, got {backend!r}')
  image = jnp.asarray(image, dtype)
  if image.ndim != 4 or image.shape[-1] != 3:
    raise ValueError(f'image must be [B, H, W, 3], got shape {image.shape}')
  b, h, w, _ = image.shape
  shape = (b, h, w, num_labels)
  if mask is not None:
    mask = filters.as_mask(mask, (b, h, w), dtype)

  def build_lattice(features):
    # Masked-out points cannot be left out of the fixed-size lattice: move
    # them out of reach of the real ones instead.
    if mask is not None:
      features = filters.separate_masked(features, mask)
    return lattice.build_lattice_batch(jax.lax.stop_gradient(features))

  def lattice_fn(features):
    lat = build_lattice(features)
    if feature_gradients:
      return functools.partial(_lattice_features, lat, features)
    return functools.partial(_lattice, lat)

  fns, weights = [], []
  if smoothness is not None:
    if backend in ('exact', 'permutohedral'):
      pos = jnp.broadcast_to(
          filters.position_features(h, w, smoothness.sxy, dtype), (b, h, w, 2))
      raw = (functools.partial(_exact, pos) if backend == 'exact' else
             lattice_fn(pos))
    else:
      raw = functools.partial(_separable, smoothness.sxy)
    fns.append(filters.normalized(raw, shape, dtype, normalization,
                                  include_self, mask))
    weights.append(smoothness.weight)
  if appearance is not None:
    feats = filters.bilateral_features(image, appearance.sxy, appearance.srgb)
    if backend == 'exact':
      raw = functools.partial(_exact, feats)
    elif backend == 'permutohedral':
      raw = lattice_fn(feats)
    else:
      raw = functools.partial(_window, feats, window_size, downsample, mask)
    fns.append(filters.normalized(raw, shape, dtype, normalization,
                                  include_self, mask))
    weights.append(appearance.weight)
  return fns, weights


def _exact(features, values, include_self):
  return filters.exact_filter(features, values, include_self=include_self)


def _lattice(lat, values, include_self):
  return lattice.permutohedral_filter(lat, values, include_self=include_self)


def _lattice_features(lat, features, values, include_self):
  # Masked points were moved in the lattice only; their values are zero, so
  # their (unmoved) features add nothing to the gradient of the real ones.
  return feature_grad.permutohedral_filter_features(
      lat, features, values, include_self=include_self)


def _separable(sxy, values, include_self):
  return filters.separable_spatial_filter(values, sxy, include_self=include_self)


def _window(features, window_size, downsample, mask, values, include_self):
  return filters.window_filter(features, values, window_size=window_size,
                               include_self=include_self, downsample=downsample,
                               mask=mask)


def pairwise_term(q, message_fns: Sequence[Callable], weights,
                  compatibility=None):
  """``sum_k P_k(Q)``: the pairwise part subtracted inside the softmax.

  Args:
    q: ``[B, H, W, L]`` current beliefs.
    message_fns: filters ``fn(q) -> m_k`` (e.g. from :func:`build_filters`).
    weights: one weight per filter (floats or traced scalars, so learnable).
    compatibility: ``None`` for pydensecrf's Potts (``-w m``), or an ``[L, L]``
      matrix ``mu`` applied as ``w sum_l' mu[l, l'] m(l')``.

  Returns:
    ``[B, H, W, L]`` pairwise energies.
  """
  if len(message_fns) != len(weights):
    raise ValueError(f'got {len(message_fns)} filters but {len(weights)} weights')
  if not message_fns:
    return jnp.zeros_like(q)
  # The compatibility is linear and shared, so weight-sum the messages first.
  msg = sum(wk * fn(q) for fn, wk in zip(message_fns, weights))
  if compatibility is None:
    return -msg
  compatibility = jnp.asarray(compatibility, q.dtype)
  num_labels = q.shape[-1]
  if compatibility.shape != (num_labels, num_labels):
    raise ValueError(f'compatibility must be [{num_labels}, {num_labels}] for '
                     f'{num_labels} labels, got shape {compatibility.shape}')
  return jnp.einsum('bhwk,lk->bhwl', msg, compatibility,
                    precision=jax.lax.Precision.HIGHEST)


def meanfield_step(unary_logits, q, message_fns: Sequence[Callable], weights,
                   compatibility=None):
  """One mean-field update ``Q' = softmax(-U - sum_k P_k(Q))``.

  The building block for a CRF-as-RNN module (Zheng et al., ICCV 2015):
  weights and ``compatibility`` may be traced (learned) arrays.

  Args:
    unary_logits: ``[B, H, W, L]`` ``-U`` (logits, or log-probabilities).
    q: ``[B, H, W, L]`` current beliefs.
    message_fns, weights, compatibility: see :func:`pairwise_term`.

  Returns:
    ``[B, H, W, L]`` updated beliefs (rows sum to one).
  """
  energy = unary_logits - pairwise_term(q, message_fns, weights, compatibility)
  return jax.nn.softmax(energy, axis=-1)


def dense_crf(unary_logits, image, *, num_iterations: int = 5,
              smoothness: Optional[GaussianKernel] = GaussianKernel(),
              appearance: Optional[BilateralKernel] = BilateralKernel(),
              compatibility=None, backend: str = 'exact',
              window_size: int = 11, downsample: int = 1,
              normalization: str = 'symmetric', include_self: bool = True,
              mask=None):
  """Mean-field inference in the dense CRF, pydensecrf's iteration order.

  Args:
    unary_logits: ``[B, H, W, L]`` float logits (``-U``); for probabilities
      use :func:`logits_from_probabilities` (pydensecrf's clip and log).
    image: ``[B, H, W, 3]`` colours in the 0..255 range (uint8 or float).
    num_iterations: mean-field updates after ``Q^0 = softmax(logits)``.
    smoothness: :class:`GaussianKernel` or ``None``.
    appearance: :class:`BilateralKernel` or ``None``.
    compatibility: ``None`` (Potts, as pydensecrf) or an ``[L, L]`` matrix.
    backend: ``'exact'`` (O(N^2), small images), ``'window'`` (ConvCRF) or
      ``'permutohedral'`` (pydensecrf's lattice).
    window_size: odd window side of the window backend's appearance kernel.
    downsample: the window backend's downsampling factor.
    normalization: ``'symmetric'`` (pydensecrf's default), ``'after'``
      (CRF-as-RNN's) or ``'none'``.
    include_self: keep the ``j == i`` message term, as pydensecrf does.
    mask: optional ``[B, H, W]``, nonzero on the pixels that take part (each
      image's unpadded region in a padded batch): inside, ``Q`` is the CRF of
      the image cropped to the mask; outside, ``softmax(unary_logits)``.

  Returns:
    ``[B, H, W, L]`` marginals ``Q``.
  """
  unary_logits = jnp.asarray(unary_logits)
  if unary_logits.ndim != 4:
    raise ValueError(f'unary_logits must be [B, H, W, L], got shape '
                     f'{unary_logits.shape}')
  if tuple(jnp.shape(image)[:3]) != unary_logits.shape[:3]:
    raise ValueError(f'image shape {jnp.shape(image)} does not match '
                     f'unary_logits shape {unary_logits.shape} in B, H, W')
  dtype = unary_logits.dtype
  fns, weights = build_filters(
      image, unary_logits.shape[-1], smoothness=smoothness,
      appearance=appearance, backend=backend, window_size=window_size,
      downsample=downsample, normalization=normalization,
      include_self=include_self, dtype=dtype, mask=mask)
  q = jax.nn.softmax(unary_logits, axis=-1)
  step = lambda _, q: meanfield_step(unary_logits, q, fns, weights,
                                     compatibility)
  # A static trip count makes fori_loop a scan, so reverse-mode AD works.
  return jax.lax.fori_loop(0, num_iterations, step, q)
