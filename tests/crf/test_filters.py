"""Tests for flaxseg.crf.filters: exact, window and separable Gaussian filters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseg.crf import filters as F


def np_filter(features, values, include_self, normalization):
  """Brute-force double loop, float64, pydensecrf's normalisation rules."""
  b, h, w, d = features.shape
  f = features.reshape(b, h * w, d).astype(np.float64)
  v = values.reshape(b, h * w, -1).astype(np.float64)
  out = np.zeros_like(v)
  for n in range(b):
    k = np.zeros((h * w, h * w))
    for i in range(h * w):
      for j in range(h * w):
        k[i, j] = np.exp(-0.5 * np.sum((f[n, i] - f[n, j]) ** 2))
    full = k.copy()
    if not include_self:
      np.fill_diagonal(k, 0.0)
    if normalization == 'none':
      out[n] = k @ v[n]
    elif normalization == 'after':   # CRF-as-RNN: K v / (K 1)
      out[n] = (k @ v[n]) / (full.sum(1) + 1e-20)[:, None]
    else:
      norm = 1.0 / np.sqrt(full.sum(1) + 1e-20)  # K 1, self included.
      out[n] = norm[:, None] * (k @ (norm[:, None] * v[n]))
  return out.reshape(values.shape)


def smooth_case(h=12, w=16):
  """A smooth colour ramp and smooth beliefs (where truncation is benign)."""
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  image = np.stack([10 * x, 8 * y, 100 + 5 * (x + y)], -1)[None]
  q = jax.nn.softmax(jnp.stack([np.sin(x / 4), np.cos(y / 3), 0 * x], -1)[None])
  return jnp.asarray(image), q


def run_normalized(fn, values, normalization, include_self=True):
  return F.normalized(fn, values.shape, values.dtype, normalization,
                      include_self)(values)


@pytest.mark.parametrize('normalization', ['none', 'symmetric', 'after'])
@pytest.mark.parametrize('include_self', [True, False])
def test_exact_matches_brute_force(normalization, include_self):
  rng = np.random.default_rng(0)
  feats = rng.normal(scale=0.8, size=(2, 3, 4, 5)).astype(np.float32)
  vals = rng.uniform(size=(2, 3, 4, 2)).astype(np.float32)
  got = run_normalized(
      lambda v, s: F.exact_filter(jnp.asarray(feats), v, include_self=s),
      jnp.asarray(vals), normalization, include_self)
  want = np_filter(feats, vals, include_self, normalization)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_features_follow_pydensecrf():
  image = np.zeros((1, 2, 3, 3), np.float32)
  image[0, 1, 2] = (26.0, 52.0, 13.0)
  f = F.bilateral_features(jnp.asarray(image), sxy=2.0, srgb=13.0)
  # (x / sxy, y / sxy, r / srgb, g / srgb, b / srgb), x the column.
  np.testing.assert_allclose(f[0, 1, 2], [1.0, 0.5, 2.0, 4.0, 1.0])


@pytest.mark.parametrize('include_self', [True, False])
def test_window_covering_image_equals_exact(include_self):
  image, q = smooth_case(6, 7)
  image = image + jnp.asarray(
      np.random.default_rng(1).uniform(0, 60, image.shape), jnp.float32)
  feats = F.bilateral_features(image, 3.0, 30.0)
  for norm in ('none', 'symmetric'):
    ex = run_normalized(lambda v, s: F.exact_filter(feats, v, include_self=s),
                        q, norm, include_self)
    wi = run_normalized(
        lambda v, s: F.window_filter(feats, v, window_size=13, include_self=s),
        q, norm, include_self)
    np.testing.assert_allclose(wi, ex, rtol=1e-5, atol=1e-6)


# Measured on smooth_case (bilateral sxy=3, srgb=40), max |window - exact| of
# the symmetric-normalised messages (max message ~0.63): 0.115 (k=5),
# 0.050 (k=7), 0.020 (k=9), 0.0076 (k=11). Pinned with ~30% headroom.
@pytest.mark.parametrize('window_size,tol', [(7, 0.065), (11, 0.01)])
def test_truncated_window_approximates_exact(window_size, tol):
  image, q = smooth_case()
  feats = F.bilateral_features(image, 3.0, 40.0)
  ex = run_normalized(lambda v, s: F.exact_filter(feats, v, include_self=s),
                      q, 'symmetric')
  wi = run_normalized(lambda v, s: F.window_filter(
      feats, v, window_size=window_size, include_self=s), q, 'symmetric')
  err = float(jnp.max(jnp.abs(wi - ex)))
  assert err < tol, err


def test_downsampled_window_approximates_exact():
  # Measured: max |err| 0.0403 of the symmetric-normalised messages (max ~0.63),
  # mostly at the image border where bilinear upsampling clamps.
  image, q = smooth_case()
  feats = F.bilateral_features(image, 3.0, 40.0)
  ex = run_normalized(lambda v, s: F.exact_filter(feats, v, include_self=s),
                      q, 'symmetric')
  ds = run_normalized(lambda v, s: F.window_filter(
      feats, v, window_size=15, include_self=s, downsample=2), q, 'symmetric')
  err = float(jnp.max(jnp.abs(ds - ex)))
  assert err < 0.052, err


@pytest.mark.parametrize('include_self', [True, False])
def test_separable_spatial_equals_exact(include_self):
  _, q = smooth_case(5, 7)
  pos = F.position_features(5, 7, 2.5)[None]
  ex = F.exact_filter(pos, q, include_self=include_self)
  sep = F.separable_spatial_filter(q, 2.5, include_self=include_self)
  np.testing.assert_allclose(sep, ex, rtol=1e-5, atol=1e-6)


def test_window_filter_jit_vmap_batch_independent():
  image, q = smooth_case(6, 8)
  rng = np.random.default_rng(2)
  images = jnp.concatenate([image, image + rng.uniform(0, 80, image.shape)], 0)
  qs = jnp.concatenate([q, q[:, ::-1]], 0)
  feats = F.bilateral_features(images, 3.0, 30.0)
  fn = jax.jit(lambda f, v: F.window_filter(f, v, window_size=5))
  batched = fn(feats, qs)
  single = jax.vmap(lambda f, v: fn(f[None], v[None])[0])(feats, qs)
  np.testing.assert_allclose(batched, single, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(batched[:1], fn(feats[:1], qs[:1]), rtol=1e-6)


def test_bad_window_size():
  with pytest.raises(ValueError, match='window_size'):
    F.window_filter(jnp.zeros((1, 2, 2, 2)), jnp.zeros((1, 2, 2, 1)),
                    window_size=4)
