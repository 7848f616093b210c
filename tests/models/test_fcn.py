"""Tests for FCN-32s/16s/8s (flaxseg/models/fcn.py) and their recipes.

Full-width models are only traced (`jax.eval_shape`); real forward passes use
width_multiplier 1/32 on small odd inputs with variables filled from NumPy.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseg.models import fcn
from flaxseg.train import optim

KEY = jax.random.key(0)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
CONSTRUCTORS = {32: fcn.fcn32s, 16: fcn.fcn16s, 8: fcn.fcn8s}
FINAL = {32: 'upscore', 16: 'upscore16', 8: 'upscore8'}


def _params(model, shape=(1, 64, 64, 3)):
  return jax.eval_shape(model.init, KEY, jnp.zeros(shape))['params']


def fake_variables(model, shape, seed=0):
  """He-scaled NumPy kernels, bilinear upsampling, N(0, 0.1) biases."""
  abstract = jax.eval_shape(model.init, KEY, jnp.zeros(shape))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if path[-2].key.startswith('upscore'):
      return jnp.asarray(fcn.bilinear_kernel(leaf.shape[0], leaf.shape[2]))
    std = np.sqrt(2. / np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 0.1
    return jnp.asarray(rng.normal(0., std, leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


# VGG-16 convs 14,714,688; fc6 7*7*512*4096 + 4096 = 102,764,544; fc7
# 4096*4096 + 4096 = 16,781,312; score_fr 4096*21 + 21 = 86,037 (together
# 134,346,581). Skips: score_pool4 512*21 + 21 = 10,773, score_pool3
# 256*21 + 21 = 5,397. Bias-free C x C transposed convs: k*k*21*21 with
# k = 4 (7,056), 16 (112,896), 32 (451,584), 64 (1,806,336).
@pytest.mark.parametrize('stride,count', [
    (32, 134_346_581 + 1_806_336),                        # 136,152,917
    (16, 134_346_581 + 10_773 + 7_056 + 451_584),         # 134,815,994
    (8, 134_346_581 + 10_773 + 5_397 + 2 * 7_056 + 112_896),  # 134,489,759
])
def test_param_counts(stride, count):
  params = _params(CONSTRUCTORS[stride](num_classes=21))
  assert sum(x.size for x in jax.tree.leaves(params)) == count
  if stride == 8:
    assert count == 134_489_759


def test_parameter_names():
  params = _params(fcn.fcn8s(num_classes=21))
  assert set(params) == {'backbone', 'score_fr', 'score_pool4', 'score_pool3',
                         'upscore2', 'upscore_pool4', 'upscore8'}
  assert set(params['upscore8']) == {'kernel'}
  assert params['upscore8']['kernel'].shape == (16, 16, 21, 21)
  assert params['upscore2']['kernel'].shape == (4, 4, 21, 21)
  assert params['score_pool3']['kernel'].shape == (1, 1, 256, 21)
  assert params['backbone']['fc6']['kernel'].shape == (7, 7, 512, 4096)
  assert set(_params(fcn.fcn32s(num_classes=21))) == {
      'backbone', 'score_fr', 'upscore'}
  assert set(_params(fcn.fcn16s(num_classes=21))) == {
      'backbone', 'score_fr', 'score_pool4', 'upscore2', 'upscore16'}


def test_paper_crop_offsets_match_caffe_prototxts():
  # Offsets of the Crop layers in the released voc-fcn{32,16,8}s nets.
  assert fcn.crop_offsets(32, 'paper') == {'final': 19}
  assert fcn.crop_offsets(16, 'paper') == {'score_pool4': 5, 'final': 27}
  assert fcn.crop_offsets(8, 'paper') == {'score_pool4': 5, 'score_pool3': 9,
                                          'final': 31}
  # Plain padding: a k = 2s transposed conv is half-pixel aligned after
  # dropping s / 2 leading outputs.
  assert fcn.crop_offsets(8, 'same') == {'score_pool4': -1, 'score_pool3': -1,
                                         'final': 4}
  assert fcn.crop_offsets(32, 'same') == {'final': 16}


@pytest.mark.parametrize('stride', [2, 8, 16, 32])
def test_upsampling_starts_bilinear(stride):
  """A linear ramp upsampled by the initial kernel is the same ramp."""
  n, c = 5, 3
  i, j = np.meshgrid(np.arange(n), np.arange(n + 1), indexing='ij')
  ramps = np.stack([2. * i - 3. * j + 1., -i + 0.5 * j, 4. * i], -1)
  x = jnp.asarray(ramps[None], jnp.float32)
  module = fcn.Upsample(stride)
  variables = module.init(KEY, x)
  kernel = variables['params']['kernel']
  np.testing.assert_array_equal(kernel,
                                fcn.bilinear_kernel(2 * stride, c))
  y = np.asarray(module.apply(variables, x))[0]
  assert y.shape == ((n - 1) * stride + 2 * stride, n * stride + 2 * stride, c)
  # Output o samples input coordinate (o + 0.5) / s - 1 (Caffe coord_map);
  # interior: both neighbours inside the input.
  oi = np.arange(stride, n * stride)
  oj = np.arange(stride, (n + 1) * stride)
  ti = (oi + 0.5) / stride - 1
  tj = (oj + 0.5) / stride - 1
  ti, tj = np.meshgrid(ti, tj, indexing='ij')
  want = np.stack([2. * ti - 3. * tj + 1., -ti + 0.5 * tj, 4. * ti], -1)
  np.testing.assert_allclose(y[stride:n * stride, stride:(n + 1) * stride],
                             want, atol=1e-5)


@pytest.mark.parametrize('padding', ['paper', 'same'])
@pytest.mark.parametrize('stride', [32, 16, 8])
def test_full_width_shapes_at_odd_size(stride, padding):
  model = CONSTRUCTORS[stride](num_classes=21, padding=padding)
  x = jnp.zeros((1, 257, 321, 3))
  variables = jax.eval_shape(model.init, KEY, x)
  logits, aux = jax.eval_shape(model.apply, variables, x)
  assert logits.shape == (1, 257, 321, 21) and logits.dtype == jnp.float32
  assert aux == {}
  assert set(variables) == {'params'}


@pytest.mark.parametrize('padding', ['paper', 'same'])
@pytest.mark.parametrize('size', [(1, 1), (7, 100), (64, 65)])
def test_any_size(padding, size):
  model = fcn.fcn8s(num_classes=3, padding=padding, width_multiplier=1 / 64)
  x = jnp.zeros((1,) + size + (3,))
  variables = jax.eval_shape(model.init, KEY, x)
  logits, _ = jax.eval_shape(model.apply, variables, x)
  assert logits.shape == (1,) + size + (3,)


@pytest.mark.parametrize('padding', ['paper', 'same'])
def test_tiny_forward_and_frozen_final_upsampling(padding):
  model = fcn.fcn8s(num_classes=5, padding=padding, width_multiplier=1 / 32)
  x = jax.random.normal(KEY, (2, 37, 45, 3))
  variables = fake_variables(model, x.shape)
  labels = jax.random.randint(jax.random.key(1), (2, 37, 45), 0, 5)

  def loss(params):
    logits, _ = model.apply({'params': params}, x)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], -1)), logits

  (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      variables['params'])
  assert logits.shape == (2, 37, 45, 5) and logits.dtype == jnp.float32
  assert np.isfinite(value)
  # The paper fixes the final upsampling; the 2x ones are learned.
  assert not np.any(grads['upscore8']['kernel'])
  assert np.any(grads['upscore2']['kernel'])
  assert np.any(grads['upscore_pool4']['kernel'])
  assert np.any(grads['backbone']['conv1_1']['kernel'])


def test_learn_final_upsampling():
  model = fcn.fcn32s(num_classes=3, width_multiplier=1 / 64,
                     learn_final_upsampling=True, padding='same')
  x = jnp.ones((1, 9, 11, 3))
  params = fake_variables(model, x.shape)['params']
  grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(
      {'params': p}, x)[0] * jnp.arange(3.))))(params)
  assert np.any(grads['upscore']['kernel'])
  assert np.any(grads['score_fr']['kernel'])


@pytest.mark.parametrize('kwargs,match', [
    (dict(num_classes=0), 'num_classes'),
    (dict(num_classes=21, padding='valid'), 'padding'),
    (dict(num_classes=21, width_multiplier=-1.), 'width_multiplier'),
    (dict(num_classes=21, dropout=1.5), 'dropout'),
    (dict(num_classes=21, dtype='int32'), 'dtype'),
])
def test_bad_arguments_are_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    fcn.fcn8s(**kwargs)


def _recipe(name):
  path = os.path.join(ROOT, 'configs', f'{name}.py')
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('stride', [32, 16, 8])
def test_recipes_build_and_freeze_final_upsampling(stride):
  recipe = _recipe(f'fcn{stride}s')
  paper = recipe.get_config()
  assert paper.model.name == f'fcn{stride}s'
  assert paper.optim.momentum == 0.99 and not paper.train.normalize_loss
  config = recipe.get_config('tiny')
  kwargs = {k: v for k, v in config.model.items()
            if k not in ('name', 'init_from', 'backbone_init')}
  # The trainer passes bn_axis_name to every model; FCN ignores it.
  model = CONSTRUCTORS[stride](num_classes=config.data.num_classes,
                               bn_axis_name='batch', **kwargs)
  crop = config.data.crop_size
  abstract = _params(model, (1, crop, crop, 3))
  params = jax.tree.map(lambda l: jnp.ones(l.shape, l.dtype), abstract)
  # The paper recipe's multipliers: final upsampling frozen (weight decay
  # included), biases 2x.
  tx = optim.create_optimizer(paper.optim, 10)
  updates, _ = tx.update(params, tx.init(params), params)
  assert not np.any(updates[FINAL[stride]]['kernel'])
  assert np.any(updates['backbone']['fc6']['kernel'])
  np.testing.assert_allclose(updates['score_fr']['bias'],
                             -2 * paper.optim.lr, rtol=1e-6)
