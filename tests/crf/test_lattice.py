"""Tests for flaxseg.crf.lattice: the permutohedral-lattice filter backend."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseg.crf import filters as F
from flaxseg.crf import lattice as L
from flaxseg.crf import meanfield as M

H, W = 16, 20


def blocky_image(h, w, num_labels, seed=0, noise=10.0):
  """Piecewise-constant colours with Gaussian noise, plus the block labels."""
  rng = np.random.default_rng(seed)
  lab = (np.arange(h)[:, None] // 14 * 3 + np.arange(w)[None, :] // 17) % num_labels
  cols = rng.uniform(0, 255, (num_labels, 3))
  img = np.clip(cols[lab] + rng.normal(0, noise, (h, w, 3)), 0, 255)
  return img.astype(np.uint8), lab


def feature_cases():
  img, _ = blocky_image(H, W, 4)
  return {
      'spatial_d2': jnp.broadcast_to(F.position_features(H, W, 3.0), (1, H, W, 2)),
      'bilateral_d5': F.bilateral_features(jnp.asarray(img, jnp.float32)[None],
                                           10.0, 13.0),
  }


# Measured relative L2 errors ||lattice - exact|| / ||exact|| for positive
# values (uniform in [0, 1)) on these cases: 0.128 (spatial, d=2) and 0.411
# (bilateral, d=5). Pinned with a small margin. The lattice is pydensecrf's
# approximation (it matches pydensecrf to float32 precision, see below), not
# the exact Gaussian.
@pytest.mark.parametrize('case,tol', [('spatial_d2', 0.14), ('bilateral_d5', 0.44)])
def test_lattice_approximates_exact(case, tol):
  feats = feature_cases()[case]
  rng = np.random.default_rng(1)
  v = jnp.asarray(rng.uniform(size=(1, H, W, 3)), jnp.float32)
  lat = L.build_lattice_batch(feats)
  out = L.permutohedral_filter(lat, v)
  ex = F.exact_filter(feats, v)
  rel = float(jnp.linalg.norm(out - ex) / jnp.linalg.norm(ex))
  assert rel < tol, rel
  # Lattice structure invariants.
  d1 = feats.shape[-1] + 1
  assert 0 < int(lat.num_vertices[0]) <= H * W * d1
  np.testing.assert_allclose(jnp.sum(lat.weights, -1), 1.0, atol=1e-5)
  assert np.all(np.asarray(lat.weights) > -1e-6)
  # Neighbour relation is symmetric: n2(n1(v)) == v wherever n1(v) exists.
  nb = np.asarray(lat.neighbours[0])
  cap = nb.shape[-1]
  for j in range(d1):
    n1, n2 = nb[j, 0], nb[j, 1]
    has = n1 < cap
    np.testing.assert_array_equal(n2[n1[has]], np.nonzero(has)[0])
  # include_self=False drops exactly values_i.
  np.testing.assert_allclose(L.permutohedral_filter(lat, v, include_self=False),
                             out - v, rtol=1e-6, atol=1e-6)


def _pydensecrf():
  return pytest.importorskip(
      'pydensecrf.densecrf',
      reason='pydensecrf2 (pip install pydensecrf2) is the reference for the '
             'permutohedral backend')


def test_raw_filter_matches_pydensecrf_lattice():
  dcrf = _pydensecrf()
  n = H * W
  rng = np.random.default_rng(2)
  for feats in feature_cases().values():
    # One mean-field step of a 2-label Potts CRF with w=1, no normalisation:
    # log(Q1_0 / Q1_1) = -(U_0 - U_1) + K(q_0 - q_1), which recovers K x.
    x = rng.uniform(-0.3, 0.3, n).astype(np.float32)
    q0 = (1 + x) / 2
    u = np.stack([-np.log(q0), -np.log(1 - q0)]).astype(np.float32)
    crf = dcrf.DenseCRF(n, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(u))
    crf.addPairwiseEnergy(
        np.ascontiguousarray(np.asarray(feats).reshape(n, -1).T, np.float32),
        compat=1.0, kernel=dcrf.DIAG_KERNEL,
        normalization=dcrf.NO_NORMALIZATION)
    q = np.asarray(crf.inference(1))
    ref = np.log(q[0] / q[1]) - (u[1] - u[0])
    lat = L.build_lattice_batch(feats)
    out = L.permutohedral_filter(lat, jnp.asarray(x).reshape(1, H, W, 1))
    # Measured max |diff| about 5e-6 (float32 logs in the recovery).
    np.testing.assert_allclose(np.asarray(out).ravel(), ref, atol=3e-5)


@pytest.mark.parametrize('h,w,nl', [(40, 50, 5), (240, 320, 21)])
def test_dense_crf_matches_pydensecrf(h, w, nl):
  """pydensecrf's standard parameters, 5 iterations; 240x320 with 21 labels
  is issue 4's acceptance case (>= 99.9% labels equal, max |dQ| <= 1e-3)."""
  dcrf = _pydensecrf()
  img, lab = blocky_image(h, w, nl, seed=0)
  rng = np.random.default_rng(0)
  logit = rng.normal(0, 1.0, (h, w, nl))
  logit[np.arange(h)[:, None], np.arange(w)[None], lab] += 1.0
  p = np.exp(logit)
  p = (p / p.sum(-1, keepdims=True)).astype(np.float32)
  crf = dcrf.DenseCRF2D(w, h, nl)
  u = -np.log(np.clip(p, 1e-5, 1)).reshape(-1, nl).T
  crf.setUnaryEnergy(np.ascontiguousarray(u, np.float32))
  crf.addPairwiseGaussian(sxy=3, compat=3)
  crf.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.ascontiguousarray(img),
                           compat=10)
  ref = np.asarray(crf.inference(5)).T.reshape(h, w, nl)
  q = M.dense_crf(M.logits_from_probabilities(jnp.asarray(p))[None],
                  jnp.asarray(img)[None], backend='permutohedral',
                  num_iterations=5)[0]
  q = np.asarray(q)
  agree = np.mean(q.argmax(-1) == ref.argmax(-1))
  max_dq = np.max(np.abs(q - ref))
  print(f'{h}x{w}, {nl} labels: labels equal {agree:.6f}, max |dQ| {max_dq:.2e}')
  # Measured: all labels equal, max |dQ| 1.2e-7 (40x50) and 5.5e-6 (240x320);
  # issue 4 asks for >= 99.9% and <= 1e-3. Pinned at 1e-4.
  assert agree >= 0.999 and max_dq <= 1e-4


def test_custom_vjp_is_transpose():
  feats = feature_cases()['bilateral_d5']
  lat = jax.tree.map(lambda a: a[0], L.build_lattice_batch(feats))
  rng = np.random.default_rng(4)
  v = jnp.asarray(rng.normal(size=(H * W, 3)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(H * W, 3)), jnp.float32)
  out, vjp = jax.vjp(L.lattice_filter, lat, v)
  out_ad, vjp_ad = jax.vjp(L.lattice_filter_autodiff, lat, v)
  np.testing.assert_allclose(out, out_ad, rtol=1e-6, atol=1e-6)
  _, gv = vjp(g)
  _, gv_ad = vjp_ad(g)
  np.testing.assert_allclose(gv, gv_ad, rtol=1e-4, atol=1e-5)
  # <g, K v> == <K^T g, v> with K^T the reversed-blur filter.
  np.testing.assert_allclose(jnp.vdot(g, out), jnp.vdot(gv, v), rtol=1e-4)


def test_dense_crf_grad_finite_differences():
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(1, 6, 7, 3)), jnp.float64)
    image = jnp.asarray(rng.uniform(0, 255, (1, 6, 7, 3)), jnp.float64)
    target = jnp.asarray(rng.uniform(size=(1, 6, 7, 3)), jnp.float64)

    def loss(l):
      q = M.dense_crf(l, image, num_iterations=3, backend='permutohedral',
                      smoothness=M.GaussianKernel(sxy=1.5),
                      appearance=M.BilateralKernel(sxy=3.0, srgb=60.0))
      return jnp.sum(q * target)

    g = jax.jit(jax.grad(loss))(logits)
    d = jnp.asarray(rng.normal(size=logits.shape))
    eps = 1e-6
    fd = (loss(logits + eps * d) - loss(logits - eps * d)) / (2 * eps)
    np.testing.assert_allclose(jnp.vdot(g, d), fd, rtol=1e-6, atol=1e-9)


def test_dense_crf_jit_batch_normalisations():
  rng = np.random.default_rng(5)
  img, _ = blocky_image(H, W, 3, seed=5)
  image = jnp.asarray(np.stack([img, img[:, ::-1]]), jnp.float32)
  logits = jnp.asarray(rng.normal(size=(2, H, W, 3)), jnp.float32)
  for norm, include_self in (('none', False), ('after', True),
                             ('symmetric', False), ('symmetric', True)):
    kw = dict(num_iterations=3, backend='permutohedral', normalization=norm,
              include_self=include_self)
    crf = jax.jit(lambda l, i, kw=kw: M.dense_crf(l, i, **kw))
    q = crf(logits, image)
    np.testing.assert_allclose(jnp.sum(q, -1), 1.0, rtol=1e-5)
  # Images in a batch are independent (one configuration: each is a compile).
  np.testing.assert_allclose(q[1:], crf(logits[1:], image[1:]),
                             rtol=1e-5, atol=1e-6)
  # Eager (un-jitted) gives the same result as jit (last configuration).
  np.testing.assert_allclose(q, M.dense_crf(logits, image, **kw),
                             rtol=1e-5, atol=1e-6)


def test_vertex_buckets_give_the_same_filter(monkeypatch):
  """The blur runs over the smallest bucket that holds the used vertices;
  every bucket gives the same result (small buckets forced here)."""
  assert L.bucket_sizes(460800) == (28800, 57600, 115200, 230400, 460800)
  assert L.bucket_sizes(6534) == (6534,)
  feats = feature_cases()['bilateral_d5']
  v = jnp.asarray(np.random.default_rng(2).uniform(size=(1, H, W, 3)),
                  jnp.float32)
  lat = L.build_lattice_batch(feats)
  one = L.permutohedral_filter(lat, v)
  monkeypatch.setattr(L, '_MIN_BUCKET', 16)
  sizes = L.bucket_sizes(H * W * 6)
  assert len(sizes) > 3 and sizes[0] < int(lat.num_vertices[0]) < sizes[-1]
  np.testing.assert_allclose(L.permutohedral_filter(lat, v), one, rtol=1e-6,
                             atol=1e-6)
