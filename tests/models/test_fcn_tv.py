"""Tests for the torchvision-compatible FCN (fcn_resnet{50,101}_tv).

Full-size models are only traced (`jax.eval_shape`); real forward passes use
ResNet-50 with base_width 4 on small odd inputs, with variables filled from
NumPy.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseg.models import fcn_tv
from model_testing import KEY, fake_variables, num_params as _num_params


@pytest.mark.parametrize('constructor,aux,count', [
    (fcn_tv.fcn_resnet50_tv, False, 32_957_013),
    (fcn_tv.fcn_resnet50_tv, True, 35_322_218),
    (fcn_tv.fcn_resnet101_tv, False, 51_949_141),
    (fcn_tv.fcn_resnet101_tv, True, 54_314_346),
])
def test_torchvision_param_counts(constructor, aux, count):
  assert _num_params(constructor(num_classes=21, aux=aux)) == count


def test_parameter_names_and_defaults():
  model = fcn_tv.fcn_resnet50_tv(num_classes=21, aux=True)
  assert (model.output_stride, model.bn_momentum, model.dropout,
          model.align_corners) == (8, 0.9, 0.1, False)
  variables = jax.eval_shape(model.init, KEY, jnp.zeros((1, 64, 64, 3)))
  params = variables['params']
  assert set(variables) == {'params', 'batch_stats'}
  assert set(params) == {'backbone', 'head_conv', 'head_bn', 'classifier',
                         'aux_conv', 'aux_bn', 'aux_classifier'}
  assert params['head_conv']['kernel'].shape == (3, 3, 2048, 512)
  assert 'bias' not in params['head_conv'] and 'bias' not in params['aux_conv']
  assert params['classifier']['kernel'].shape == (1, 1, 512, 21)
  assert params['classifier']['bias'].shape == (21,)
  assert params['aux_conv']['kernel'].shape == (3, 3, 1024, 256)
  assert params['aux_classifier']['kernel'].shape == (1, 1, 256, 21)


@pytest.mark.parametrize('constructor', [fcn_tv.fcn_resnet50_tv,
                                         fcn_tv.fcn_resnet101_tv])
def test_full_size_shapes_at_output_stride_8(constructor):
  heads = {}

  def interceptor(next_fun, args, kwargs, context):
    if context.module.name in ('head_conv', 'aux_conv'):
      heads[context.module.name] = args[0].shape
    return next_fun(*args, **kwargs)

  model = constructor(num_classes=21, aux=True)
  with nn.intercept_methods(interceptor):
    (logits, aux), _ = jax.eval_shape(model.init_with_output, KEY,
                                      jnp.zeros((2, 257, 321, 3)))
  assert logits.shape == (2, 257, 321, 21) and logits.dtype == jnp.float32
  assert aux['aux_logits'].shape == (2, 257, 321, 21)
  # Both heads see stride-8 maps: ceil(257 / 8) x ceil(321 / 8).
  assert heads == {'head_conv': (2, 33, 41, 2048),
                   'aux_conv': (2, 33, 41, 1024)}


def test_tiny_forward_train_and_eval():
  shape = (2, 37, 45, 3)
  model = fcn_tv.fcn_resnet50_tv(num_classes=5, base_width=4, aux=True)
  variables = fake_variables(model, shape)
  x = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)
  logits, aux = jax.jit(model.apply)(variables, x)
  assert logits.shape == shape[:3] + (5,) and logits.dtype == jnp.float32
  assert aux['aux_logits'].shape == logits.shape
  assert np.all(np.isfinite(logits)) and float(jnp.std(logits)) > 0

  @jax.jit
  def train(variables, key):
    return model.apply(variables, x, train=True, mutable=['batch_stats'],
                       rngs={'dropout': key})

  (a, _), updates = train(variables, jax.random.key(1))
  (b, _), _ = train(variables, jax.random.key(2))
  assert not np.allclose(a, b)  # Dropout is on in training.
  changed = jax.tree.map(lambda u, v: bool(jnp.any(u != v)),
                         updates['batch_stats'], variables['batch_stats'])
  assert all(jax.tree.leaves(changed))


def test_bfloat16_compute_float32_params_and_logits():
  model = fcn_tv.fcn_resnet50_tv(num_classes=21, dtype='bfloat16', aux=True)
  (logits, aux), variables = jax.eval_shape(
      model.init_with_output, KEY, jnp.zeros((1, 65, 65, 3)))
  assert logits.dtype == aux['aux_logits'].dtype == jnp.float32
  assert {v.dtype for v in jax.tree.leaves(variables)} == {
      jnp.dtype(jnp.float32)}


def test_options_and_errors():
  model = fcn_tv.fcn_resnet101_tv(num_classes=3, output_stride=16,
                                  bn_axis_name='batch', frozen_bn=True)
  assert (model.depth, model.output_stride, model.frozen_bn) == (101, 16, True)
  with pytest.raises(ValueError, match='output_stride=4'):
    fcn_tv.fcn_resnet50_tv(num_classes=21, output_stride=4)
  with pytest.raises(ValueError, match='num_classes=0'):
    fcn_tv.fcn_resnet50_tv(num_classes=0)
  with pytest.raises(ValueError, match='dropout=1.5'):
    fcn_tv.fcn_resnet50_tv(num_classes=21, dropout=1.5)
  with pytest.raises(ValueError, match='aux_dropout=-1'):
    fcn_tv.fcn_resnet50_tv(num_classes=21, aux_dropout=-1)
  with pytest.raises(ValueError, match='base_width=0'):
    fcn_tv.fcn_resnet50_tv(num_classes=21, base_width=0)
  with pytest.raises(ValueError, match='dtype'):
    fcn_tv.fcn_resnet50_tv(num_classes=21, dtype='int8')
