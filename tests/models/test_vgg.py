"""Tests for the VGG-16 encoder (flaxseg/models/vgg.py).

Full-width models are only traced (`jax.eval_shape`); real forward passes use
width_multiplier 1/16 on small odd inputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseg.models import vgg

KEY = jax.random.key(0)


def _params(model, shape=(1, 64, 64, 3)):
  return jax.eval_shape(model.init, KEY, jnp.zeros(shape))['params']


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def fake_variables(model, shape, seed=0):
  """Variables of `model` with He-scaled NumPy kernels (random init under
  eager JAX costs far more than a jitted forward pass on CPU)."""
  abstract = jax.eval_shape(model.init, KEY, jnp.zeros(shape))
  rng = np.random.default_rng(seed)

  def fill(leaf):
    std = np.sqrt(2. / np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 0.1
    return jnp.asarray(rng.normal(0., std, leaf.shape), leaf.dtype)

  return jax.tree.map(fill, abstract)


def test_conv_layers_match_torchvision_count():
  # torchvision vgg16().features: 13 convs with bias, 14,714,688 parameters.
  params = _params(vgg.VGG16(include_fc=False))
  assert _count(params) == 14_714_688
  assert set(params) == {n for n in vgg.TORCHVISION_NAMES
                         if n.startswith('conv')}


@pytest.mark.parametrize('style,fc6,fc7', [
    ('fcn', (7, 7, 512, 4096), (1, 1, 4096, 4096)),
    ('deeplab', (3, 3, 512, 1024), (1, 1, 1024, 1024)),
])
def test_fc_shapes_and_names(style, fc6, fc7):
  kw = {}
  if style == 'deeplab':
    kw = dict(fc6_kernel=3, fc6_dilation=12, fc6_features=1024,
              fc7_features=1024, fc6_padding='SAME', pool5a=True)
  params = _params(vgg.VGG16(style=style, **kw))
  assert set(params) == set(vgg.TORCHVISION_NAMES)
  assert params['fc6']['kernel'].shape == fc6
  assert params['fc7']['kernel'].shape == fc7
  assert params['conv1_1']['kernel'].shape == (3, 3, 3, 64)
  assert params['conv5_3']['bias'].shape == (512,)
  # classifier.0 is Linear(25088 = 512 * 7 * 7, 4096) in torchvision.
  if style == 'fcn':
    assert np.prod(fc6[:3]) == 25088


@pytest.mark.parametrize('style,conv1_padding,fc6_padding', [
    ('fcn', 100, 'VALID'), ('fcn', 1, 'SAME'), ('deeplab', 1, 'SAME')])
def test_feature_shapes_any_size(style, conv1_padding, fc6_padding):
  kw = dict(fc6_kernel=3, fc6_dilation=12) if style == 'deeplab' else {}
  model = vgg.VGG16(style=style, conv1_padding=conv1_padding,
                    fc6_padding=fc6_padding, fc6_features=64,
                    fc7_features=64, **kw)
  x = jnp.zeros((1, 257, 321, 3))
  out = jax.eval_shape(
      lambda x: model.init_with_output(KEY, x)[0], x)
  hs = vgg.output_size(257, style, conv1_padding)
  ws = vgg.output_size(321, style, conv1_padding)
  for i in range(5):
    assert out[f'pool{i + 1}'].shape[1:3] == (hs[i], ws[i])
  if style == 'deeplab':
    # Output stride 8: (257 - 1) / 8 + 1 = 33, (321 - 1) / 8 + 1 = 41.
    assert hs[-1] == 33 and ws[-1] == 41
    assert out['fc7'].shape[1:3] == (33, 41)
  elif conv1_padding == 1:
    assert hs[-1] == 9 and ws[-1] == 11         # ceil(257 / 32), ceil(321 / 32)
    assert out['fc7'].shape[1:3] == (9, 11)
  else:
    assert out['fc7'].shape[1:3] == (hs[-1] - 6, ws[-1] - 6)  # 7x7 VALID


def _reference_pool(x, window, stride, pad):
  """NumPy Caffe ceil-mode max pool of a (H, W) array."""
  h, w = x.shape
  out = []
  for size in (h, w):
    o = int(np.ceil((size + 2 * pad - window) / stride)) + 1
    if pad and (o - 1) * stride >= size + pad:
      o -= 1
    out.append(o)
  y = np.empty(out)
  for i in range(out[0]):
    for j in range(out[1]):
      r0, c0 = i * stride - pad, j * stride - pad
      r1, c1 = min(r0 + window, h), min(c0 + window, w)
      y[i, j] = x[max(r0, 0):r1, max(c0, 0):c1].max()
  return y


@pytest.mark.parametrize('size', [(7, 8), (10, 9), (13, 13)])
@pytest.mark.parametrize('window,stride,pad', [(2, 2, 0), (3, 2, 1),
                                               (3, 1, 1)])
def test_caffe_max_pool(size, window, stride, pad):
  x = np.random.default_rng(0).normal(size=size)
  got = vgg.caffe_max_pool(jnp.asarray(x)[None, :, :, None], window, stride,
                           pad)[0, :, :, 0]
  np.testing.assert_allclose(got, _reference_pool(x, window, stride, pad))


def test_width_multiplier_and_tiny_forward():
  model = vgg.VGG16(style='deeplab', width_multiplier=1 / 16, fc6_kernel=3,
                    fc6_dilation=12, fc6_features=1024, fc7_features=1024,
                    fc6_padding='SAME', pool5a=True)
  x = jax.random.normal(KEY, (2, 37, 45, 3))
  variables = fake_variables(model, x.shape)
  params = variables['params']
  assert set(variables) == {'params'}
  assert params['conv1_1']['kernel'].shape == (3, 3, 3, 4)
  assert params['fc6']['kernel'].shape == (3, 3, 32, 64)
  apply = jax.jit(model.apply, static_argnames='train')
  out = apply(variables, x)
  # Caffe ceil mode: 37 -> 19 -> 10 -> 6 and 45 -> 23 -> 12 -> 7.
  assert out['fc7'].shape == (2, 6, 7, 64)
  assert vgg.output_size(37, 'deeplab')[-1] == 6
  assert out['pool5a'].shape == out['pool5'].shape
  assert np.all(np.isfinite(out['fc7'])) and np.any(out['fc7'] > 0)
  dropped = apply(variables, x, train=True,
                  rngs={'dropout': jax.random.key(1)})
  # Dropout 0.5 zeroes about half of fc7 and doubles the rest.
  zeroed = np.mean(np.asarray(dropped['fc7']) == 0) - np.mean(
      np.asarray(out['fc7']) == 0)
  assert 0.2 < zeroed < 0.6


def test_bfloat16_compute_float32_params():
  model = vgg.VGG16(width_multiplier=1 / 32, fc6_features=64,
                    fc7_features=64, dtype='bfloat16', fc6_padding='SAME')
  x = jnp.ones((1, 19, 23, 3))
  variables, out = jax.eval_shape(
      lambda x: model.init_with_output(KEY, x)[::-1], x)
  assert out['fc7'].dtype == jnp.bfloat16
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))


@pytest.mark.parametrize('kwargs,match', [
    (dict(style='vgg'), 'style'),
    (dict(width_multiplier=0.0), 'width_multiplier'),
    (dict(conv1_padding=-1), 'conv1_padding'),
    (dict(fc6_dilation=0), 'fc6_dilation'),
    (dict(fc6_padding='FULL'), 'fc6_padding'),
    (dict(dropout=1.0), 'dropout'),
])
def test_bad_config_is_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _params(vgg.VGG16(**kwargs))
