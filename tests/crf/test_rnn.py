"""Tests for flaxseg.crf.rnn (CRF-as-RNN) and flaxseg.crf.feature_grad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseg.crf import feature_grad, filters, lattice
from flaxseg.crf import meanfield as M
from flaxseg.crf.rnn import CRFasRNN

H, W, L = 10, 12, 3


def case(seed=0, batch=1, dtype=jnp.float32):
  """Three vertical colour bands, noisy unaries."""
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(W)[None, None] * L // W, H, 1)
  labels = np.repeat(labels, batch, 0)
  colours = np.array([[200, 40, 40], [30, 60, 210], [40, 190, 60]], float)
  image = colours[labels] + rng.normal(0, 8, labels.shape + (3,))
  logits = np.where(np.arange(L) == labels[..., None], 1.0, -0.5)
  logits = logits + rng.normal(scale=0.8, size=logits.shape)
  return jnp.asarray(logits, dtype), jnp.asarray(image, dtype), labels


def layer(**kw):
  kw.setdefault('num_classes', L)
  kw.setdefault('theta_alpha', 6.0)
  kw.setdefault('theta_beta', 20.0)
  kw.setdefault('theta_gamma', 1.5)
  kw.setdefault('backend', 'exact')
  return CRFasRNN(**kw)


def test_initial_layer_is_the_dense_crf():
  """At initialisation (diagonal weights, Potts -I) the layer computes
  pydensecrf-style mean field: softmax of its output is dense_crf's Q."""
  logits, image, _ = case(batch=2)
  for norm in ('symmetric', 'after'):
    crf = layer(normalization=norm, num_iterations=4, eval_iterations=7)
    variables = crf.init(jax.random.key(0), logits, image)
    assert set(variables['params']) == {
        'spatial_weights', 'bilateral_weights', 'compatibility'}
    for train, iters in ((True, 4), (False, 7)):
      out = crf.apply(variables, logits, image, train)
      ref = M.dense_crf(
          logits, image, num_iterations=iters, backend='exact',
          normalization=norm,
          smoothness=M.GaussianKernel(sxy=1.5, weight=3.0),
          appearance=M.BilateralKernel(sxy=6.0, srgb=20.0, weight=5.0))
      np.testing.assert_allclose(jax.nn.softmax(out), ref, rtol=1e-5,
                                 atol=1e-6, err_msg=f'{norm} {train}')


def test_crf_cleans_noisy_unaries_and_batches_independently():
  logits, image, labels = case(seed=1, batch=3)
  crf = layer(backend='permutohedral')
  variables = jax.jit(crf.init)(jax.random.key(0), logits, image)
  apply = jax.jit(crf.apply, static_argnums=3)
  out = apply(variables, logits, image, False)
  base = np.mean(np.argmax(logits, -1) == labels)
  acc = np.mean(np.argmax(out, -1) == labels)
  assert base < 0.9 and acc > base + 0.1, (base, acc)
  for n in range(3):
    one = apply(variables, logits[n:n + 1], image[n:n + 1], False)
    np.testing.assert_allclose(out[n:n + 1], one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('backend,learn', [('exact', True),
                                           ('permutohedral', False)])
def test_gradients_match_finite_differences(backend, learn):
  with jax.enable_x64(True):
    logits, image, _ = case(seed=2, batch=2, dtype=jnp.float64)
    logits, image = logits[:, :5, :6], image[:, :5, :6]
    target = jnp.asarray(np.random.default_rng(0).uniform(
        size=logits.shape))
    crf = layer(backend=backend, learn_bandwidths=learn, num_iterations=3)
    params = jax.jit(crf.init)(jax.random.key(0), logits, image)['params']
    rng = np.random.default_rng(1)
    # Off-Potts parameters, so every entry of the matrices matters.
    params = jax.tree.map(
        lambda p: p + 0.1 * jnp.asarray(rng.normal(size=p.shape)), params)

    def loss(params, logits):
      out = crf.apply({'params': params}, logits, image, True)
      return jnp.sum(jax.nn.log_softmax(out) * target)

    loss = jax.jit(loss)
    g_params, g_logits = jax.jit(jax.grad(loss, argnums=(0, 1)))(
        params, logits)
    if learn:
      assert 'log_bandwidths' in g_params
    flat, _ = jax.tree_util.tree_flatten_with_path(g_params)
    for path, g in flat + [(('logits',), g_logits)]:
      x_of = lambda p, lg, path=path: (lg if path == ('logits',) else
                                       _get(p, path))
      x = x_of(params, logits)
      d = jnp.asarray(rng.normal(size=x.shape))
      eps = 1e-5

      def moved(sign, path=path, d=d):
        if path == ('logits',):
          return loss(params, logits + sign * eps * d)
        return loss(_set(params, path, _get(params, path) + sign * eps * d),
                    logits)

      fd = (moved(1) - moved(-1)) / (2 * eps)
      np.testing.assert_allclose(jnp.vdot(g, d), fd, rtol=1e-5, atol=1e-8,
                                 err_msg=str(path))


def _get(tree, path):
  for k in path:
    tree = tree[getattr(k, 'key', k)]
  return tree


def _set(tree, path, value):
  key = getattr(path[0], 'key', path[0])
  out = dict(tree)
  out[key] = value if len(path) == 1 else _set(tree[key], path[1:], value)
  return out


def test_remat_gives_the_same_gradients():
  logits, image, _ = case(seed=3)
  target = jax.nn.one_hot(jnp.argmax(logits, -1), L)
  grads = []
  for remat in (False, True):
    crf = layer(remat=remat, backend='permutohedral')
    params = jax.jit(crf.init)(jax.random.key(0), logits, image)['params']
    grads.append(jax.jit(jax.grad(lambda p, crf=crf: jnp.sum(
        jax.nn.log_softmax(crf.apply({'params': p}, logits, image, True))
        * target)))(params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6), *grads)


def test_feature_cotangent_formula_is_the_exact_filter_gradient():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    n, d, c = 40, 5, 3
    f = jnp.asarray(rng.normal(size=(n, d)) * 1.5 + 4.0)
    v, g = jnp.asarray(rng.random((n, c))), jnp.asarray(rng.normal(size=(n, c)))

    def exact(f, x):
      return filters.exact_filter(f.reshape(1, n, 1, d),
                                  x.reshape(1, n, 1, -1)).reshape(n, -1)

    ref = jax.vjp(exact, f, v)[1](g)[0]
    k = lambda x: exact(f, x)
    got = feature_grad.feature_cotangent(k, k, f, v, g)
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)


def test_lattice_feature_gradient_follows_the_exact_one():
  """The lattice's feature gradient is the exact formula with the lattice's
  K: its error against the exact filter's gradient is the filter's own
  approximation error (measured: 0.129 vs 0.126 on positions, 0.416 vs 0.439
  on a two-colour image), and it points the same way (cosine >= 0.99)."""
  rng = np.random.default_rng(0)
  h = w = 24
  img = np.zeros((1, h, w, 3))
  img[:, :, :12] = [200, 30, 30]
  img[:, :, 12:] = [20, 180, 60]
  img += rng.normal(0, 5, img.shape)
  feats = {'position': filters.position_features(h, w, 3.0)[None],
           'bilateral': filters.bilateral_features(jnp.asarray(img, jnp.float32),
                                                   10.0, 13.0)}
  for name, f in feats.items():
    d = f.shape[-1]
    v = jnp.asarray(rng.random((1, h, w, L)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(1, h, w, L)), jnp.float32)

    @jax.jit
    def grads(f, v, g):
      out, vjp = jax.vjp(filters.exact_filter, f, v)
      lat = lattice.build_lattice_batch(f)
      out_l, vjp_l = jax.vjp(
          lambda f_, v_: feature_grad.permutohedral_filter_features(
              lat, f_, v_), f, v)
      return out, vjp(g)[0], out_l, vjp_l(g)[0]

    out, ref, out_l, got = grads(f, v, g)
    rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    cos = float(jnp.vdot(got, ref) / jnp.linalg.norm(got) /
                jnp.linalg.norm(ref))
    assert cos >= 0.99, (name, cos)
    assert rel(got, ref) <= rel(out_l, out) + 0.05, (name, rel(got, ref),
                                                     rel(out_l, out))
    assert got.shape == (1, h, w, d)


def test_learnable_bandwidths_on_the_lattice_get_the_exact_direction():
  logits, image, labels = case(seed=4)
  target = jax.nn.one_hot(labels, L)
  grads = {}
  for backend in ('exact', 'permutohedral'):
    crf = layer(backend=backend, learn_bandwidths=True)
    params = jax.jit(crf.init)(jax.random.key(0), logits, image)['params']
    np.testing.assert_allclose(jnp.exp(params['log_bandwidths']),
                               [6.0, 20.0, 1.5], rtol=1e-6)
    grads[backend] = jax.jit(jax.grad(lambda p, crf=crf: -jnp.sum(
        jax.nn.log_softmax(crf.apply({'params': p}, logits, image, True))
        * target)))(params)['log_bandwidths']
  a, b = grads['exact'], grads['permutohedral']
  assert np.all(np.abs(b) > 0), b
  cos = float(jnp.vdot(a, b) / jnp.linalg.norm(a) / jnp.linalg.norm(b))
  assert cos > 0.9, (a, b)


def test_bad_inputs():
  logits, image, _ = case()
  crf = layer()
  with pytest.raises(ValueError, match='unary_logits'):
    crf.init(jax.random.key(0), logits[..., :2], image)
  with pytest.raises(ValueError, match='image'):
    crf.init(jax.random.key(0), logits, image[:, :4])
