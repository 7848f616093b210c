"""Tests for DeepLab v1 LargeFOV (flaxseg/models/deeplab_v1.py) and its recipe.

Full-width models are only traced (`jax.eval_shape`); real forward passes use
width_multiplier 1/16 on small odd inputs with variables filled from NumPy.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseg.models import layers
from flaxseg.models.deeplab_v1 import deeplabv1_largefov
from flaxseg.train import optim

KEY = jax.random.key(0)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))


def _params(model, shape=(1, 64, 64, 3)):
  return jax.eval_shape(model.init, KEY, jnp.zeros(shape))['params']


def fake_variables(model, shape, seed=0):
  """He-scaled NumPy kernels and N(0, 0.1) biases."""
  abstract = jax.eval_shape(model.init, KEY, jnp.zeros(shape))
  rng = np.random.default_rng(seed)

  def fill(leaf):
    std = np.sqrt(2. / np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 0.1
    return jnp.asarray(rng.normal(0., std, leaf.shape), leaf.dtype)

  return jax.tree.map(fill, abstract)


def test_param_count_and_names():
  params = _params(deeplabv1_largefov(num_classes=21))
  # 14,714,688 (conv1-5) + fc6 3*3*512*1024 + 1024 = 4,719,616
  # + fc7 1024*1024 + 1024 = 1,049,600 + fc8 1024*21 + 21 = 21,525.
  assert sum(x.size for x in jax.tree.leaves(params)) == 20_505_429
  assert set(params) == {'backbone', 'fc8'}
  assert params['backbone']['fc6']['kernel'].shape == (3, 3, 512, 1024)
  assert params['backbone']['fc7']['kernel'].shape == (1, 1, 1024, 1024)
  assert params['fc8']['kernel'].shape == (1, 1, 1024, 21)
  assert 'conv5_3' in params['backbone']


@pytest.mark.parametrize('size,stride8', [((321, 321), (41, 41)),
                                          ((257, 321), (33, 41)),
                                          ((306, 306), (40, 40))])
def test_full_width_shapes(size, stride8):
  model = deeplabv1_largefov(num_classes=21)
  x = jnp.zeros((1,) + size + (3,))
  variables = jax.eval_shape(model.init, KEY, x)
  assert set(variables) == {'params'}
  logits, aux = jax.eval_shape(model.apply, variables, x)
  assert logits.shape == (1,) + size + (21,) and logits.dtype == jnp.float32
  assert aux['logits_stride8'].shape == (1,) + stride8 + (21,)


def test_tiny_forward_corner_aligned_upsampling():
  model = deeplabv1_largefov(num_classes=5, width_multiplier=1 / 16)
  # 8k + 1 sides at every pool: 41 -> 21 -> 11 -> 6, 49 -> 25 -> 13 -> 7.
  x = jax.random.normal(KEY, (2, 41, 49, 3))
  variables = fake_variables(model, x.shape)
  apply = jax.jit(model.apply, static_argnames='train')
  logits, aux = apply(variables, x)
  scores = aux['logits_stride8']
  assert logits.shape == (2, 41, 49, 5) and scores.shape == (2, 6, 7, 5)
  assert np.all(np.isfinite(logits))
  # Caffe Interp (align_corners): score i sits on input pixel 8 i.
  np.testing.assert_allclose(logits[:, ::8, ::8], scores, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(
      logits, layers.resize_bilinear(scores, (41, 49), align_corners=True),
      rtol=1e-6, atol=1e-6)
  dropped, _ = apply(variables, x, train=True,
                     rngs={'dropout': jax.random.key(1)})
  assert not np.allclose(dropped, logits)


@pytest.mark.parametrize('kwargs,match', [
    (dict(num_classes=0), 'num_classes'),
    (dict(num_classes=21, fc6_dilation=0), 'fc6_dilation'),
    (dict(num_classes=21, fc6_features=0), 'fc6_features'),
    (dict(num_classes=21, width_multiplier=0), 'width_multiplier'),
    (dict(num_classes=21, dropout=-0.1), 'dropout'),
])
def test_bad_arguments_are_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    deeplabv1_largefov(**kwargs)


def _recipe():
  path = os.path.join(ROOT, 'configs', 'deeplabv1.py')
  spec = importlib.util.spec_from_file_location('deeplabv1', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_recipe_builds_and_multipliers_match_params():
  recipe = _recipe()
  paper = recipe.get_config()
  assert paper.model.name == 'deeplabv1_largefov'
  assert paper.data.batch_size == 20 and paper.optim.lr == 1e-3
  config = recipe.get_config('tiny')
  kwargs = {k: v for k, v in config.model.items()
            if k not in ('name', 'init_from', 'backbone_init')}
  model = deeplabv1_largefov(num_classes=config.data.num_classes,
                             bn_axis_name='batch', **kwargs)
  crop = config.data.crop_size
  logits, _ = jax.eval_shape(model.apply, jax.eval_shape(
      model.init, KEY, jnp.zeros((1, crop, crop, 3))),
                             jnp.zeros((1, crop, crop, 3)))
  assert logits.shape == (1, crop, crop, config.data.num_classes)
  # Caffe lr_mult: fc8 kernel 10x, fc8 bias 20x, backbone biases 2x.
  params = jax.tree.map(lambda l: jnp.ones(l.shape, l.dtype),
                        _params(model, (1, crop, crop, 3)))
  tx = optim.create_optimizer(paper.optim, 10)
  updates, _ = tx.update(params, tx.init(params), params)
  lr, wd = paper.optim.lr, paper.optim.weight_decay
  np.testing.assert_allclose(updates['fc8']['bias'], -20 * lr, rtol=1e-5)
  np.testing.assert_allclose(updates['fc8']['kernel'], -10 * lr * (1 + wd),
                             rtol=1e-5)
  np.testing.assert_allclose(updates['backbone']['conv3_2']['bias'], -2 * lr,
                             rtol=1e-5)
  np.testing.assert_allclose(updates['backbone']['fc6']['kernel'],
                             -lr * (1 + wd), rtol=1e-5)
