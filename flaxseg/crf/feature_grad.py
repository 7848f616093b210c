"""Gradients of a Gaussian filter with respect to its features.

The lattice filter's ``custom_vjp`` (:mod:`flaxseg.crf.lattice`) treats the
lattice as a constant: no gradient reaches the features, hence none reaches
the bandwidths they are scaled by. Learnable bandwidths (CRF-as-RNN's
``learn_bandwidths``) need it. For the Gaussian ``K_ij = exp(-|f_i - f_j|^2/2)``
and ``out = K v``, with cotangent ``g``:

    dL/df_i = - sum_c g_ic (f_i (K v_c)_i - (K (f v_c))_i)
              - sum_c v_ic (f_i (K^T g_c)_i - (K^T (f g_c))_i)

(``dK_ij/df_i = -K_ij (f_i - f_j)``; the second line is ``i`` as the source
``j`` of other pixels' messages). Every term is itself a Gaussian filter, so
the permutohedral lattice computes it, the approach of Krähenbühl & Koltun,
"Parameter Learning and Convergent Inference for Dense Random Fields"
(ICML 2013, sec. 5): ``d (C + 1)`` extra channels through the forward and the
transposed lattice filter. The result is the gradient of the exact Gaussian
filter evaluated with the lattice's approximation of ``K``, not the derivative
of the lattice's own (piecewise) dependence on the features.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from flaxseg.crf import lattice


def feature_cotangent(k: Callable, kt: Callable, features, values, g):
  """``dL/df`` for ``out = K values`` given ``K``, ``K^T`` and ``g = dL/dout``.

  Args:
    k: ``k(x [..., N, C']) -> K x``.
    kt: ``kt(x [..., N, C']) -> K^T x``.
    features: ``[..., N, d]`` features (leading axes: a batch of images).
    values: ``[..., N, C]`` filtered values.
    g: ``[..., N, C]`` cotangent of the output.

  Returns:
    ``[..., N, d]`` cotangent of the features.
  """
  *lead, n, d = features.shape
  c = values.shape[-1]
  # The gradient depends on feature differences only; centring keeps the
  # products f (K v) and K (f v) small before they are subtracted.
  f = features.astype(values.dtype)
  f = f - jnp.mean(f, axis=-2, keepdims=True)

  def times_f(x):
    return (f[..., :, None] * x[..., None, :]).reshape(*lead, n, d * c)

  kv = k(jnp.concatenate([values, times_f(values)], axis=-1))
  k_v, k_fv = kv[..., :c], kv[..., c:].reshape(*lead, n, d, c)
  ktg = kt(jnp.concatenate([g, times_f(g)], axis=-1))
  kt_g, kt_fg = ktg[..., :c], ktg[..., c:].reshape(*lead, n, d, c)
  first = f * jnp.sum(g * k_v, axis=-1, keepdims=True) - jnp.einsum(
      '...nc,...ndc->...nd', g, k_fv)
  second = f * jnp.sum(values * kt_g, axis=-1, keepdims=True) - jnp.einsum(
      '...nc,...ndc->...nd', values, kt_fg)
  return (-(first + second)).astype(features.dtype)


@jax.custom_vjp
def lattice_filter_features(lat: lattice.Lattice, features, values):
  """:func:`lattice.lattice_filter_batch` with a gradient for ``features``.

  Args:
    lat: the lattices built from ``features`` (``lattice.build_lattice_batch``
      or, for features moved by a mask, from those).
    features: ``[B, N, d]`` the features the gradient is taken for.
    values: ``[B, N, C]`` values.

  Returns:
    ``[B, N, C]``, the lattice filter of ``values`` (self term included).
  """
  del features
  return lattice.lattice_filter_batch(lat, values)


def _transpose(lat, x):
  _, vjp = jax.vjp(lambda v: lattice.lattice_filter_batch(lat, v), x)
  return vjp(x)[0]


def _fwd(lat, features, values):
  return lattice.lattice_filter_batch(lat, values), (lat, features, values)


def _bwd(res, g):
  lat, features, values = res
  kt = lambda x: _transpose(lat, x)
  d_values = kt(g)
  d_features = feature_cotangent(
      lambda x: lattice.lattice_filter_batch(lat, x), kt, features, values, g)
  return (jax.tree.map(lattice._zero_cotangent, lat),  # pylint: disable=protected-access
          d_features, d_values)


lattice_filter_features.defvjp(_fwd, _bwd)


def permutohedral_filter_features(lat: lattice.Lattice, features, values, *,
                                  include_self: bool = True):
  """:func:`lattice_filter_features` with the filter interface.

  Args:
    lat: a lattice from ``lattice.build_lattice_batch(features)``.
    features: ``[B, H, W, d]`` the same features (traced: gradients flow).
    values: ``[B, H, W, C]`` values.
    include_self: keep the ``j == i`` term (pydensecrf).

  Returns:
    ``[B, H, W, C]`` filtered values.
  """
  b, h, w, c = values.shape
  d = features.shape[-1]
  out = lattice_filter_features(lat, features.reshape(b, h * w, d),
                                values.reshape(b, h * w, c))
  out = out.reshape(b, h, w, c)
  return out if include_self else out - values
