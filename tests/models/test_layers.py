"""Tests for flaxseg.models.layers: resizing, FrozenBatchNorm, norm factory."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseg.models import layers


def _np_axis_weights(in_size, out_size, align_corners):
  """PyTorch's upsample_bilinear2d source indices and weights for one axis."""
  i = np.arange(out_size, dtype=np.float64)
  if align_corners:
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    src = i * scale
  else:
    src = np.maximum((i + 0.5) * in_size / out_size - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(int), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  return i0, i1, src - i0


def np_resize_bilinear(x, size, align_corners):
  """Reference NHWC bilinear resize written from PyTorch's formulas."""
  h0, h1, hl = _np_axis_weights(x.shape[1], size[0], align_corners)
  w0, w1, wl = _np_axis_weights(x.shape[2], size[1], align_corners)
  x = x.astype(np.float64)
  rows = (x[:, h0] * (1 - hl)[None, :, None, None]
          + x[:, h1] * hl[None, :, None, None])
  return (rows[:, :, w0] * (1 - wl)[None, None, :, None]
          + rows[:, :, w1] * wl[None, None, :, None])


SIZES = [
    ((5, 7), (9, 4)),     # up in H, down in W
    ((13, 6), (4, 11)),   # non-integer downsampling in H
    ((8, 8), (4, 4)),     # integer downsampling: antialiasing would differ
    ((3, 5), (17, 33)),   # large upsampling, odd sizes
    ((6, 6), (1, 1)),
]


@pytest.mark.parametrize('align_corners', [False, True])
@pytest.mark.parametrize('in_size,out_size', SIZES)
def test_resize_matches_reference(in_size, out_size, align_corners):
  x = np.random.default_rng(0).normal(size=(2, *in_size, 3)).astype(np.float32)
  got = layers.resize_bilinear(jnp.asarray(x), out_size, align_corners)
  want = np_resize_bilinear(x, out_size, align_corners)
  assert got.shape == (2, *out_size, 3)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_resize_known_values():
  # torch.nn.functional.interpolate(x, size=..., mode='bilinear', ...) on
  # [[1, 2], [3, 4]].
  x = jnp.array([[1., 2.], [3., 4.]])[None, :, :, None]
  half_pixel = layers.resize_bilinear(x, (4, 4))[0, :, :, 0]
  np.testing.assert_allclose(half_pixel, [[1., 1.25, 1.75, 2.],
                                          [1.5, 1.75, 2.25, 2.5],
                                          [2.5, 2.75, 3.25, 3.5],
                                          [3., 3.25, 3.75, 4.]])
  corners = layers.resize_bilinear(x, (3, 3), align_corners=True)[0, :, :, 0]
  np.testing.assert_allclose(corners, [[1., 1.5, 2.], [2., 2.5, 3.],
                                       [3., 3.5, 4.]])


@pytest.mark.parametrize('align_corners', [False, True])
def test_resize_keeps_dtype_and_identity(align_corners):
  x = jnp.arange(2 * 3 * 4 * 2, dtype=jnp.bfloat16).reshape(2, 3, 4, 2)
  assert layers.resize_bilinear(x, (5, 7), align_corners).dtype == jnp.bfloat16
  assert layers.resize_bilinear(x, (3, 4), align_corners) is x
  with pytest.raises(ValueError, match='NHWC'):
    layers.resize_bilinear(x[0], (5, 7), align_corners)


def test_frozen_bn_matches_formula_and_batchnorm_names():
  x = jax.random.normal(jax.random.key(0), (2, 3, 3, 4))
  frozen = layers.FrozenBatchNorm()
  variables = frozen.init(jax.random.key(1), x)
  reference = nn.BatchNorm(use_running_average=True).init(jax.random.key(1), x)
  assert (jax.tree.structure(variables) == jax.tree.structure(reference))
  stats = {'mean': jnp.array([0.5, -1., 0., 2.]),
           'var': jnp.array([1., 4., 0.25, 2.])}
  params = {'scale': jnp.array([1., 2., -1., 0.5]),
            'bias': jnp.array([0., 1., 2., -3.])}
  variables = {'params': params, 'batch_stats': stats}
  want = ((x - stats['mean']) / jnp.sqrt(stats['var'] + 1e-5)
          * params['scale'] + params['bias'])
  np.testing.assert_allclose(frozen.apply(variables, x), want, rtol=1e-5,
                             atol=1e-5)
  # Same numbers as nn.BatchNorm in inference mode with the same variables.
  np.testing.assert_allclose(
      nn.BatchNorm(use_running_average=True, epsilon=1e-5).apply(variables, x),
      want, rtol=1e-5, atol=1e-5)


def test_frozen_bn_no_grad_no_update():
  x = jax.random.normal(jax.random.key(0), (2, 3, 3, 4))
  frozen = layers.FrozenBatchNorm()
  variables = frozen.init(jax.random.key(1), x)

  def loss(params, x):
    y, _ = frozen.apply({'params': params,
                         'batch_stats': variables['batch_stats']}, x,
                        use_running_average=False, mutable=['batch_stats'])
    return jnp.sum(y ** 2)

  grads, x_grad = jax.grad(loss, argnums=(0, 1))(variables['params'], x)
  for g in jax.tree.leaves(grads):
    np.testing.assert_array_equal(g, 0.)
  assert float(jnp.abs(x_grad).sum()) > 0  # Input gradients still flow.
  _, updates = frozen.apply(variables, x + 3., use_running_average=False,
                            mutable=['batch_stats'])
  jax.tree.map(np.testing.assert_array_equal, updates['batch_stats'],
               variables['batch_stats'])


def test_frozen_bn_bf16():
  x = jnp.ones((1, 2, 2, 3), jnp.bfloat16)
  frozen = layers.FrozenBatchNorm(dtype=jnp.bfloat16)
  variables = frozen.init(jax.random.key(0), x)
  assert frozen.apply(variables, x).dtype == jnp.bfloat16
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))


def test_make_norm():
  norm = layers.make_norm(momentum=0.99, axis_name='data', dtype=jnp.bfloat16)
  assert isinstance(norm, functools.partial) and norm.func is nn.BatchNorm
  assert norm.keywords == dict(momentum=0.99, epsilon=1e-5, axis_name='data',
                               dtype=jnp.bfloat16, use_fast_variance=False)
  frozen = layers.make_norm(frozen=True)
  assert frozen.func is layers.FrozenBatchNorm
  # Both accept the train mode at call time.
  x = jnp.ones((2, 1, 1, 3))
  for n in (layers.make_norm(), frozen):
    v = n().init(jax.random.key(0), x, use_running_average=True)
    n().apply(v, x, use_running_average=False, mutable=['batch_stats'])


def test_batchnorm_train_updates_stats_with_flax_momentum():
  norm = layers.make_norm(momentum=0.9)()
  x = jnp.arange(8.).reshape(8, 1, 1, 1)
  v = norm.init(jax.random.key(0), x, use_running_average=True)
  _, upd = norm.apply(v, x, use_running_average=False, mutable=['batch_stats'])
  np.testing.assert_allclose(upd['batch_stats']['mean'], [0.1 * 3.5])


def test_conv_kernel_init_is_he_fan_out():
  kernel = layers.conv_kernel_init(jax.random.key(0), (3, 3, 32, 256))
  np.testing.assert_allclose(float(jnp.std(kernel)),
                             np.sqrt(2. / (3 * 3 * 256)), rtol=0.03)
  # Untruncated normal, as torch.nn.init.kaiming_normal_.
  assert float(jnp.abs(kernel).max()) > 2.5 * np.sqrt(2. / (3 * 3 * 256))


def test_canonicalize_dtype():
  assert layers.canonicalize_dtype('bfloat16') == jnp.bfloat16
  assert layers.canonicalize_dtype(jnp.float32) == jnp.float32
  with pytest.raises(ValueError, match='int32'):
    layers.canonicalize_dtype('int32')
  with pytest.raises(ValueError, match='bf16x'):
    layers.canonicalize_dtype('bf16x')


def test_computed_once_is_exact_and_so_is_its_gradient():
  x = jnp.array([[np.nan, 1.5, -0.0, np.inf, -np.inf, 1e-30, -3e38, 2.0]],
                jnp.float32)
  for dtype in (jnp.float32, jnp.bfloat16):
    xd = x.astype(dtype)
    out = jax.jit(layers.computed_once)(xd)
    assert out.dtype == dtype
    # Bit for bit, NaN and signed zero included: a NaN first element (the
    # one `computed_once` reads) does not spread.
    np.testing.assert_array_equal(
        np.asarray(out).view(np.uint16 if dtype == jnp.bfloat16 else
                             np.uint32),
        np.asarray(xd).view(np.uint16 if dtype == jnp.bfloat16 else
                            np.uint32))
  # Subnormals: XLA:CPU flushes them to zero in any arithmetic, so the
  # ReLU that `computed_once` follows in a block has already done so.
  tiny = jnp.array([1e-40, -1e-40, 3.0], jnp.float32)
  relu = jax.jit(jax.nn.relu)(tiny)
  np.testing.assert_array_equal(
      np.asarray(jax.jit(lambda v: layers.computed_once(jax.nn.relu(v)))(
          tiny)).view(np.uint32), np.asarray(relu).view(np.uint32))
  w = jnp.arange(8.0).reshape(1, 8)
  grad = jax.grad(lambda v: jnp.sum(layers.computed_once(v) * w))(
      jnp.ones((1, 8)))
  np.testing.assert_array_equal(grad, w)
  assert layers.computed_once(jnp.zeros((0, 3))).shape == (0, 3)


def test_computed_once_survives_xla_on_cpu():
  """The full-size division is what stops XLA:CPU duplicating the
  producer; XLA must neither fold it away (a constant 1.0 would be) nor
  rewrite it as a multiply by a reciprocal (a broadcast 1.0 would be)."""
  if jax.default_backend() != 'cpu':
    pytest.skip('a no-op off the CPU')
  f = jax.jit(lambda v: layers.computed_once(jnp.exp(v)))
  hlo = f.lower(jnp.ones((4, 8))).compile().as_text()
  assert re.search(r'= f32\[4,8\]\S* divide\(', hlo), hlo
  assert not re.search(r'= f32\[4,8\]\S* multiply\(', hlo), hlo
