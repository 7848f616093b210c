"""Tests for DeepLab v3+ (encoder-decoder on ResNet).

Full-size models are only traced (`jax.eval_shape`); real forward passes use
ResNet-18 with base_width 8 on small odd inputs, with variables filled from
NumPy.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseg.models import deeplab, deeplab_v3plus, resnet
from model_testing import KEY, fake_variables, num_params as _num_params


def tiny(**kwargs):
  kwargs.setdefault('base_width', 8)
  kwargs.setdefault('aspp_width', 16)
  kwargs.setdefault('low_level_width', 8)
  kwargs.setdefault('decoder_width', 16)
  return deeplab_v3plus.deeplabv3plus_resnet18(num_classes=5, **kwargs)


def _decoder_params(low_channels, aspp=256, low=48, width=256):
  """Decoder conv kernels plus BatchNorm scale and bias."""
  return (low_channels * low + 2 * low + 9 * (aspp + low) * width + 2 * width
          + 9 * width * width + 2 * width)


@pytest.mark.parametrize('constructor,count,low_channels', [
    (deeplab_v3plus.deeplabv3plus_resnet18, 16_608_181, 64),
    (deeplab_v3plus.deeplabv3plus_resnet50, 40_352_181, 256),
    (deeplab_v3plus.deeplabv3plus_resnet101, 59_344_309, 256),
])
def test_param_counts(constructor, count, low_channels):
  assert _num_params(constructor(num_classes=21)) == count
  # The encoder and classifier are those of the paper DeepLab v3.
  v3 = getattr(deeplab, constructor.__name__.replace('plus', ''))
  assert count == (_num_params(v3(num_classes=21)) +
                   _decoder_params(low_channels))


def test_parameter_names():
  model = deeplab_v3plus.deeplabv3plus_resnet50(num_classes=21, aux=True)
  variables = jax.eval_shape(model.init, KEY, jnp.zeros((1, 64, 64, 3)))
  params = variables['params']
  assert set(params) == {'backbone', 'aspp', 'decoder', 'classifier',
                         'aux_conv', 'aux_bn', 'aux_classifier'}
  assert set(params['decoder']) == {'project_conv', 'project_bn', 'conv1',
                                    'bn1', 'conv2', 'bn2'}
  decoder = params['decoder']
  assert decoder['project_conv']['kernel'].shape == (1, 1, 256, 48)
  assert decoder['conv1']['kernel'].shape == (3, 3, 256 + 48, 256)
  assert decoder['conv2']['kernel'].shape == (3, 3, 256, 256)
  assert all('bias' not in p for p in decoder.values() if 'kernel' in p)
  assert params['classifier']['kernel'].shape == (1, 1, 256, 21)
  assert 'bias' in params['classifier']


def test_variant_defaults():
  model = deeplab_v3plus.deeplabv3plus_resnet101(num_classes=21)
  assert (model.depth, model.output_stride, model.multi_grid,
          model.aspp_rates, model.low_level_width, model.decoder_width,
          model.bn_momentum, model.align_corners, model.aux) == (
              101, 16, (1, 2, 4), (6, 12, 18), 48, 256, 0.9997, True, False)
  assert deeplab_v3plus.deeplabv3plus_resnet50(
      num_classes=21, output_stride=8).aspp_rates == (12, 24, 36)


@pytest.mark.parametrize('output_stride', [8, 16])
def test_full_size_shapes_and_decoder_input(output_stride):
  seen = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, resnet.ResNet):
      seen['layer1'] = out['layer1'].shape
    if isinstance(context.module, deeplab_v3plus.Decoder):
      seen['encoded'], seen['low_level'] = args[0].shape, args[1].shape
      seen['decoded'] = out.shape
    return out

  model = deeplab_v3plus.deeplabv3plus_resnet101(
      num_classes=21, output_stride=output_stride, aux=True)
  with nn.intercept_methods(interceptor):
    (logits, aux), _ = jax.eval_shape(model.init_with_output, KEY,
                                      jnp.zeros((2, 257, 321, 3)))
  assert logits.shape == (2, 257, 321, 21) and logits.dtype == jnp.float32
  assert aux['aux_logits'].shape == (2, 257, 321, 21)
  # The decoder fuses the stride-4 layer1 features (65 x 81) with the
  # encoder output at the output stride.
  assert seen['layer1'] == seen['low_level'] == (2, 65, 81, 256)
  stride_size = {8: (33, 41), 16: (17, 21)}[output_stride]
  assert seen['encoded'] == (2,) + stride_size + (256,)
  assert seen['decoded'] == (2, 65, 81, 256)


def test_tiny_forward_uses_layer1_features():
  shape = (2, 37, 45, 3)
  model = tiny(aux=True)
  variables = fake_variables(model, shape)
  x = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)

  def perturb_layer1(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, resnet.ResNet):
      out = dict(out, layer1=out['layer1'] + 1.0)
    return out

  logits, aux = jax.jit(model.apply)(variables, x)
  assert logits.shape == shape[:3] + (5,) and logits.dtype == jnp.float32
  assert aux['aux_logits'].shape == logits.shape
  assert np.all(np.isfinite(logits)) and float(jnp.std(logits)) > 0
  with nn.intercept_methods(perturb_layer1):
    changed, changed_aux = model.apply(variables, x)
  assert float(jnp.max(jnp.abs(changed - logits))) > 1e-3
  # Only the decoder reads layer1: the layer3 auxiliary head is unchanged.
  np.testing.assert_allclose(changed_aux['aux_logits'], aux['aux_logits'],
                             rtol=1e-5, atol=1e-5)


def test_tiny_train_step_stats_and_dropout():
  shape = (2, 33, 33, 3)
  model = tiny(aspp_dropout=0.5)
  variables = fake_variables(model, shape)
  x = jnp.asarray(np.random.default_rng(2).normal(size=shape), jnp.float32)

  @jax.jit
  def train(variables, key):
    return model.apply(variables, x, train=True, mutable=['batch_stats'],
                       rngs={'dropout': key})

  (a, _), updates = train(variables, jax.random.key(1))
  (b, _), _ = train(variables, jax.random.key(2))
  assert not np.allclose(a, b)
  changed = jax.tree.map(lambda u, v: bool(jnp.any(u != v)),
                         updates['batch_stats'], variables['batch_stats'])
  assert all(jax.tree.leaves(changed))


def test_bfloat16_compute_float32_params_and_logits():
  model = deeplab_v3plus.deeplabv3plus_resnet50(num_classes=21,
                                                dtype='bfloat16')
  (logits, _), variables = jax.eval_shape(
      model.init_with_output, KEY, jnp.zeros((1, 65, 65, 3)))
  assert logits.dtype == jnp.float32
  assert {v.dtype for v in jax.tree.leaves(variables)} == {
      jnp.dtype(jnp.float32)}


def test_errors_name_the_option():
  build = deeplab_v3plus.deeplabv3plus_resnet50
  with pytest.raises(ValueError, match='low_level_width=0'):
    build(num_classes=21, low_level_width=0)
  with pytest.raises(ValueError, match='decoder_width=-1'):
    build(num_classes=21, decoder_width=-1)
  with pytest.raises(ValueError, match='aspp_rates'):
    build(num_classes=21, aspp_rates=(1, 2))
  with pytest.raises(ValueError, match='output_stride=4'):
    build(num_classes=21, output_stride=4)
  with pytest.raises(ValueError, match='multi_grid'):
    build(num_classes=21, multi_grid=())
  with pytest.raises(ValueError, match='aux_dropout=1.0'):
    build(num_classes=21, aux_dropout=1.0)
  with pytest.raises(ValueError, match='num_classes=0'):
    build(num_classes=0)
