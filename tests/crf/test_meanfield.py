"""Tests for flaxseg.crf.meanfield: dense-CRF mean-field inference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseg.crf import meanfield as M

H, W = 12, 16


def two_region_case(seed=0, batch=1):
  """Left/right halves with a clean colour edge; unaries with 35% flips."""
  rng = np.random.default_rng(seed)
  labels = np.zeros((batch, H, W), np.int32)
  labels[:, :, W // 2 + 1:] = 1
  image = np.where(labels[..., None] == 0, [200.0, 40.0, 40.0],
                   [30.0, 60.0, 210.0]).astype(np.float32)
  noisy = np.where(rng.uniform(size=labels.shape) < 0.35, 1 - labels, labels)
  logits = np.where(np.arange(2) == noisy[..., None], 1.0, -1.0)
  logits = logits + rng.normal(scale=0.3, size=logits.shape)
  return jnp.asarray(logits, jnp.float32), jnp.asarray(image), labels


@pytest.mark.parametrize('backend', ['exact', 'window'])
def test_meanfield_improves_accuracy(backend):
  logits, image, labels = two_region_case()
  base = float(np.mean(np.argmax(logits, -1) == labels))
  q = M.dense_crf(logits, image, backend=backend, window_size=9,
                  appearance=M.BilateralKernel(sxy=10.0, srgb=13.0, weight=10.0))
  acc = float(np.mean(np.argmax(q, -1) == labels))
  np.testing.assert_allclose(jnp.sum(q, -1), 1.0, rtol=1e-5)
  assert base < 0.75 and acc > 0.97, (base, acc)


def test_zero_iterations_is_softmax_and_probabilities_helper():
  logits, image, _ = two_region_case()
  q = M.dense_crf(logits, image, num_iterations=0)
  np.testing.assert_allclose(q, jax.nn.softmax(logits), rtol=1e-6)
  # pydensecrf's unary_from_softmax: U = -log(clip(p, 1e-5, 1)).
  p = jnp.asarray([[0.0, 0.25, 0.75]])
  np.testing.assert_allclose(M.logits_from_probabilities(p),
                             np.log([[1e-5, 0.25, 0.75]]), rtol=1e-6)


def test_potts_equals_explicit_matrices():
  logits, image, _ = two_region_case()
  ref = M.dense_crf(logits, image, num_iterations=3)
  eye = jnp.eye(2)
  # pydensecrf's PottsCompatibility(w) is -w*I on the message; the textbook
  # w*[l != l'] differs by a per-pixel constant that softmax removes.
  for mu in (-eye, 1.0 - eye):
    q = M.dense_crf(logits, image, num_iterations=3, compatibility=mu)
    np.testing.assert_allclose(q, ref, rtol=1e-5, atol=1e-6)


def test_window_covering_image_equals_exact_crf():
  logits, image, _ = two_region_case()
  for norm in ('none', 'symmetric'):
    ex = M.dense_crf(logits, image, num_iterations=3, normalization=norm)
    wi = M.dense_crf(logits, image, num_iterations=3, normalization=norm,
                     backend='window', window_size=2 * W - 1)
    np.testing.assert_allclose(wi, ex, rtol=1e-4, atol=1e-5)


def test_jit_vmap_batch_independent():
  logits, image, _ = two_region_case(seed=1, batch=2)
  image = image.at[1].set(image[1, :, ::-1])
  crf = jax.jit(lambda l, i: M.dense_crf(l, i, num_iterations=3))
  batched = crf(logits, image)
  vmapped = jax.vmap(lambda l, i: crf(l[None], i[None])[0])(logits, image)
  np.testing.assert_allclose(batched, vmapped, rtol=1e-5, atol=1e-6)
  for n in range(2):
    np.testing.assert_allclose(batched[n], crf(logits[n:n + 1], image[n:n + 1])[0],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('backend', ['exact', 'window'])
def test_gradients_match_finite_differences(backend):
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(1, 3, 4, 3)), jnp.float64)
    image = jnp.asarray(rng.uniform(0, 255, (1, 3, 4, 3)), jnp.float64)
    target = jnp.asarray(rng.uniform(size=(1, 3, 4, 3)), jnp.float64)

    def loss(logits, weights, mu, backend):
      fns, _ = M.build_filters(image, 3, backend=backend, window_size=3,
                               smoothness=M.GaussianKernel(sxy=1.5),
                               appearance=M.BilateralKernel(sxy=3.0, srgb=60.0),
                               dtype=jnp.float64)
      q = jax.nn.softmax(logits)
      for _ in range(3):
        q = M.meanfield_step(logits, q, fns, weights, mu)
      return jnp.sum(q * target)

    args = (logits, jnp.asarray([3.0, 10.0]), 1.0 - jnp.eye(3))
    loss = jax.jit(loss, static_argnums=3)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(
        *args, backend)
    # Directional finite differences for the logits, weights and compatibility.
    for g, x in zip(grads, args):
      assert np.all(np.isfinite(g))
      d = jnp.asarray(rng.normal(size=x.shape))
      eps = 1e-6
      fd = (loss(*[a + eps * d if a is x else a for a in args], backend) -
            loss(*[a - eps * d if a is x else a for a in args], backend)) / (2 * eps)
      np.testing.assert_allclose(jnp.vdot(g, d), fd, rtol=1e-6, atol=1e-9)
    # dense_crf itself (fori_loop) is differentiable end to end too.
    g = jax.grad(lambda l: jnp.sum(
        M.dense_crf(l, image, backend=backend, window_size=3) * target))(logits)
    assert g.dtype == jnp.float64 and np.all(np.isfinite(g))


def test_bad_arguments():
  logits, image, _ = two_region_case()
  with pytest.raises(ValueError, match='backend'):
    M.dense_crf(logits, image, backend='lattice')
  with pytest.raises(ValueError, match='normalization'):
    M.dense_crf(logits, image, normalization='before')
  with pytest.raises(ValueError, match='compatibility'):
    M.dense_crf(logits, image, compatibility=jnp.eye(3))
  with pytest.raises(ValueError, match='image shape'):
    M.dense_crf(logits, image[:, :4])
