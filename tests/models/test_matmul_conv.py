"""Tests for layers.MatmulConv (per-tap matmul convolution) and conv_impl."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseg import models
from flaxseg.models import layers

KEY = jax.random.key(0)

# (kernel, strides, dilation, padding, in, out, input size): the shapes the
# models use (3x3 dilated with padding = rate, strided 1x1 projections, the
# 7x7/2 stem), rates beyond the map (ASPP at rate 36 on a small map: only the
# centre tap reaches the input), odd sizes, asymmetric and string paddings.
CASES = [
    ((3, 3), 1, 1, ((1, 1), (1, 1)), 16, 8, (13, 16)),
    ((3, 3), 2, 1, ((1, 1), (1, 1)), 16, 8, (13, 16)),
    ((3, 3), 1, 4, ((4, 4), (4, 4)), 16, 8, (17, 20)),
    ((3, 3), 1, 36, ((36, 36), (36, 36)), 16, 8, (9, 12)),
    ((3, 3), 1, 12, ((12, 12), (12, 12)), 16, 8, (13, 16)),
    ((1, 1), 2, 1, 'VALID', 16, 8, (13, 16)),
    ((1, 1), 1, 1, 'VALID', 32, 8, (5, 6)),
    ((7, 7), 2, 1, ((3, 3), (3, 3)), 3, 8, (21, 24)),
    ((3, 3), 1, 1, 'SAME', 16, 4, (10, 13)),
    ((3, 3), 2, 2, 'SAME', 16, 4, (11, 14)),
    ((3, 3), 2, 3, ((2, 2), (2, 2)), 16, 4, (12, 15)),
    ((2, 3), (3, 1), 1, ((0, 1), (2, 0)), 16, 4, (12, 15)),
    ((3, 3), 1, 1, 1, 16, 4, (6, 7)),
]


# xla_max_channels=0: every case (but the 3-channel stem) as taps; 256 (the
# default): the dense stride-1 ones (cases 0, 2, 8, 12) go to XLA's
# convolution, the rest compute as with 0.
@pytest.mark.parametrize(
    'kernel,strides,dilation,padding,cin,cout,size,xla_max_channels',
    [case + (0,) for case in CASES] +
    [CASES[i] + (256,) for i in (0, 2, 8, 12)])
def test_matmul_conv_equals_nn_conv(kernel, strides, dilation, padding, cin,
                                    cout, size, xla_max_channels):
  use_bias = cin == 16
  args = dict(features=cout, kernel_size=kernel, strides=strides,
              padding=padding, kernel_dilation=dilation, use_bias=use_bias)
  ref = nn.Conv(**args)
  mm = layers.MatmulConv(**args, xla_max_channels=xla_max_channels)
  x = jax.random.normal(KEY, (2,) + size + (cin,))
  v = ref.init(KEY, x)
  if use_bias:
    v = {'params': dict(v['params'], bias=jax.random.normal(
        jax.random.key(1), (cout,)))}
  # Same parameter tree: the two are interchangeable in checkpoints.
  assert (jax.tree.map(jnp.shape, mm.init(KEY, x)) ==
          jax.tree.map(jnp.shape, v))
  y_ref, y = ref.apply(v, x), mm.apply(v, x)
  assert y.shape == y_ref.shape
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  weight = jax.random.normal(jax.random.key(2), y_ref.shape)

  def grads(module):
    return jax.grad(lambda v, x: jnp.sum(module.apply(v, x) * weight),
                    argnums=(0, 1))(v, x)

  for a, b in zip(jax.tree.leaves(grads(mm)), jax.tree.leaves(grads(ref))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_matmul_conv_skips_taps_that_only_see_padding():
  # Rate 36 on a 9x9 map: eight of the nine taps only ever read padding, so
  # the computation holds one matmul, not nine.
  mm = layers.MatmulConv(4, (3, 3), padding=((36, 36), (36, 36)),
                         kernel_dilation=36, use_bias=False)
  x = jnp.ones((1, 9, 9, 16))
  v = mm.init(KEY, x)
  text = jax.jit(mm.apply).lower(v, x).as_text()
  assert text.count('dot_general') == 1
  np.testing.assert_allclose(
      mm.apply(v, x), jnp.einsum('nhwc,cd->nhwd', x,
                                 v['params']['kernel'][1, 1]), rtol=1e-6)


def test_matmul_conv_bf16_accumulates_in_float32():
  args = dict(features=8, kernel_size=(3, 3), padding='SAME', use_bias=False)
  x = jax.random.normal(KEY, (2, 9, 9, 64))
  v = nn.Conv(**args).init(KEY, x)
  y32 = nn.Conv(**args).apply(v, x)
  y = layers.MatmulConv(**args, dtype=jnp.bfloat16).apply(v, x)
  assert y.dtype == jnp.bfloat16
  # bf16 inputs and kernel, float32 sums: within bf16 rounding of float32.
  err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - y32)))
  assert err < 0.05 * float(jnp.max(jnp.abs(y32)))


def test_matmul_conv_exports_with_symbolic_sizes():
  mm = layers.MatmulConv(4, (3, 3), padding=((2, 2), (2, 2)),
                         kernel_dilation=2)
  v = mm.init(KEY, jnp.ones((1, 8, 8, 16)))
  h, w = jax.export.symbolic_shape('h, w')
  exported = jax.export.export(jax.jit(mm.apply))(
      v, jax.ShapeDtypeStruct((1, h, w, 16), jnp.float32))
  x = jax.random.normal(KEY, (1, 11, 7, 16))
  np.testing.assert_allclose(exported.call(v, x), mm.apply(v, x), rtol=1e-5,
                             atol=1e-5)


def test_matmul_conv_rejects_a_kernel_larger_than_its_input():
  mm = layers.MatmulConv(4, (3, 3), padding='VALID', kernel_dilation=4)
  with pytest.raises(ValueError, match='smaller than the dilated kernel'):
    mm.init(KEY, jnp.ones((1, 5, 5, 16)))


def test_resolve_conv_impl():
  assert layers.resolve_conv_impl('xla') == 'xla'
  assert layers.resolve_conv_impl('matmul') == 'matmul'
  expected = 'matmul' if jax.default_backend() == 'cpu' else 'xla'
  assert layers.resolve_conv_impl('auto') == expected
  assert layers.resolve_conv_impl('taps') == 'taps'
  assert layers.conv_module('xla') is nn.Conv
  assert layers.conv_module('matmul') is layers.MatmulConv
  assert layers.conv_module('taps')(4, (3, 3)).xla_max_channels == 0
  with pytest.raises(ValueError, match="conv_impl='cudnn'"):
    models.create_model('deeplabv3_resnet50_tv', num_classes=3,
                        conv_impl='cudnn')


@pytest.mark.parametrize('name', ['deeplabv3_resnet50_tv', 'deeplabv3_resnet101',
                                  'fcn_resnet50_tv'])
def test_conv_impl_reaches_every_convolution(name):
  # With 'taps' the only XLA convolution left is the RGB stem's.
  x = jnp.zeros((1, 33, 33, 3))
  counts = []
  for impl in ('xla', 'taps'):
    model = models.create_model(name, num_classes=3, base_width=16,
                                conv_impl=impl)
    variables = jax.eval_shape(model.init, KEY, x)
    jaxpr = str(jax.make_jaxpr(
        lambda v, x, model=model: model.apply(v, x)[0])(variables, x))
    counts.append(jaxpr.count('conv_general_dilated['))
  assert counts[0] > 50 and counts[1] == 1


def test_matmul_hands_dense_narrow_convolutions_to_xla():
  # Full-width DeepLab v3-R50 at a 321 crop (output stride 8): 'matmul'
  # leaves to XLA's convolution the stem and the dense stride-1 3x3 with at
  # most 256 channels: layer1's 3 (64, rate 1 on 81x81), layer2's last 3
  # (128, 41x41), layer3's 6 (256, rate 2) and the head's 3x3 (256 after
  # ASPP). Taps: layer2's strided first, layer4's (512 channels), ASPP's
  # (rates 12-36, 2048 in) and every 1x1.
  model = models.create_model('deeplabv3_resnet50_tv', num_classes=21,
                              conv_impl='matmul')
  x = jax.ShapeDtypeStruct((1, 321, 321, 3), jnp.float32)
  variables = jax.eval_shape(model.init, KEY, x)
  jaxpr = str(jax.make_jaxpr(model.apply)(variables, x))
  assert jaxpr.count('conv_general_dilated[') == 1 + 3 + 3 + 6 + 1
  # On a 41x41 map a rate-12 3x3 reaches 65% of the dense products: taps.
  def density(rate):
    reach = layers._tap_reach(3, 3, rate, rate, 1, 1, rate, rate, 41, 41, 41,
                              41)
    return layers._tap_density(reach, 3, 3, 41, 41)

  assert density(12) < layers.XLA_MIN_TAP_DENSITY < density(2)


def test_models_compute_the_same_with_either_conv_impl():
  # ResNet, ASPP and the FCN auxiliary head, with channels on both sides of
  # MATMUL_MIN_CHANNELS.
  name, kwargs = 'deeplabv3_resnet18', dict(base_width=8, aspp_width=16,
                                            aux=True, aspp_dropout=0.0,
                                            aux_dropout=0.0)
  x = jax.random.normal(KEY, (2, 25, 25, 3))

  def run(impl, dtype):
    model = models.create_model(name, num_classes=3, conv_impl=impl,
                                dtype=dtype, **kwargs)
    variables = jax.jit(model.init)(KEY, x.astype(jnp.float32))
    variables = jax.tree.map(lambda a: a.astype(dtype), variables)

    def loss(params):
      (logits, aux), _ = model.apply(
          {'params': params, 'batch_stats': variables['batch_stats']},
          x.astype(dtype), train=True, mutable=['batch_stats'])
      return jnp.mean(logits ** 2) + sum(jnp.mean(a ** 2)
                                         for a in aux.values())

    return variables, jax.jit(jax.value_and_grad(loss))(variables['params'])

  with jax.enable_x64(True):
    v0, (l0, g0) = run('xla', 'float32')
    _, (l64, g64) = run('xla', 'float64')
    # 'matmul' hands this narrow model's dense 3x3 to XLA; 'taps' does not.
    for impl in ('matmul', 'taps'):
      v1, (l1, g1) = run(impl, 'float32')
      # Same names and shapes, same initial values.
      assert jax.tree.structure(v0) == jax.tree.structure(v1)
      for a, b in zip(jax.tree.leaves(v0), jax.tree.leaves(v1)):
        np.testing.assert_array_equal(a, b)
      np.testing.assert_allclose(l0, l1, rtol=1e-5)
      # Gradients: in float32 the tiny model's BatchNorm chains amplify
      # round-off (both implementations are up to ~1e-3 of a leaf's scale
      # from float64), so the matmul form is held to the float64 reference:
      # no further from it than 3x XLA's own distance (measured: at most
      # 2.1x).
      for ref, a, b in zip(jax.tree.leaves(g64), jax.tree.leaves(g0),
                           jax.tree.leaves(g1)):
        err_xla = float(jnp.max(jnp.abs(a - ref)))
        err_mm = float(jnp.max(jnp.abs(b - ref)))
        assert err_mm <= 3 * err_xla + 1e-6 * float(jnp.max(jnp.abs(ref)))
