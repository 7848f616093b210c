"""Tests for the U-Nets: the paper's valid network with overlap-tile
inference, and the padded BatchNorm variant.

Full-size models are only traced (`jax.eval_shape`); real forward passes use
widths of 2 to 8 channels, with variables filled from NumPy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseg.models import unet
from model_testing import KEY, fake_variables, num_params as _num_params


def _images(shape, seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape),
                     jnp.float32)


# --- the original network ----------------------------------------------------

def test_original_param_count_paper():
  # Fig. 1: 1 input channel, 2 classes.
  model = unet.unet_original(num_classes=2)
  assert _num_params(model, (1, 64, 64, 1)) == 31_030_658
  # Input channels come from the images: 2 more channels, 2 * 9 * 64 more.
  assert _num_params(model, (1, 64, 64, 3)) == 31_030_658 + 2 * 9 * 64


def test_original_parameter_names():
  variables = jax.eval_shape(unet.unet_original(num_classes=2).init, KEY,
                             jnp.zeros((1, 64, 64, 1)))
  assert set(variables) == {'params'}  # No BatchNorm in the paper.
  params = variables['params']
  expected = {f'enc{i}_conv{j}' for i in range(5) for j in (1, 2)}
  expected |= {f'dec{i}_{n}' for i in range(4)
               for n in ('upconv', 'conv1', 'conv2')}
  assert set(params) == expected | {'classifier'}
  assert params['enc4_conv2']['kernel'].shape == (3, 3, 1024, 1024)
  assert params['dec3_upconv']['kernel'].shape == (2, 2, 1024, 512)
  assert params['dec3_conv1']['kernel'].shape == (3, 3, 1024, 512)
  assert params['classifier']['kernel'].shape == (1, 1, 64, 2)
  assert all('bias' in p for p in params.values())


def test_raw_valid_network_maps_572_to_388():
  model = unet.unet_original(num_classes=2, overlap_tile=False)
  (logits, aux), _ = jax.eval_shape(model.init_with_output, KEY,
                                    jnp.zeros((1, 572, 572, 1)))
  assert logits.shape == (1, 388, 388, 2) and aux == {}
  assert unet.valid_output_size(572) == 388
  assert unet.tile_size(388) == 572 and unet.tile_size(389) == 588
  assert unet.tile_size(1) == 188  # The smallest valid tile.
  for bad in (573, 172):
    with pytest.raises(ValueError, match=f'input size {bad}'):
      jax.eval_shape(model.init, KEY, jnp.zeros((1, bad, 572, 1)))


@pytest.mark.parametrize('size', [(257, 321), (1, 5), (388, 388)])
def test_overlap_tile_full_size_shapes(size):
  model = unet.unet_original(num_classes=2)
  (logits, _), _ = jax.eval_shape(model.init_with_output, KEY,
                                  jnp.zeros((2,) + size + (1,)))
  assert logits.shape == (2,) + size + (2,) and logits.dtype == jnp.float32


def test_overlap_tile_is_mirror_pad_valid_net_and_crop():
  shape = (2, 37, 45, 1)
  x = _images(shape)
  model = unet.unet_original(num_classes=3, base_width=2)
  variables = fake_variables(model, shape)
  logits, _ = jax.jit(model.apply)(variables, x)
  assert logits.shape == shape[:3] + (3,)
  assert np.all(np.isfinite(logits)) and float(jnp.std(logits)) > 0
  # Fig. 2: mirror the image, 92 px before it, the rest of the 236 px tile
  # (16 * 7 + 124, the smallest whose 52 px output covers 45) after it.
  tile = np.pad(np.asarray(x), ((0, 0), (92, 236 - 37 - 92),
                                (92, 236 - 45 - 92), (0, 0)), mode='reflect')
  raw = model.clone(overlap_tile=False)
  valid, _ = jax.jit(raw.apply)(variables, jnp.asarray(tile))
  assert valid.shape == (2, 52, 52, 3)
  np.testing.assert_allclose(logits, valid[:, :37, :45], rtol=1e-5, atol=1e-5)


def test_valid_network_crops_are_centred():
  # With width-symmetric kernels, a width-symmetric tile gives a
  # width-symmetric output only if every skip crop is centred, i.e. output
  # pixel i sits on input pixel i + 92 (the 184 lost pixels split evenly).
  model = unet.unet_original(num_classes=2, base_width=2, overlap_tile=False)
  shape = (1, 188, 188, 1)
  variables = fake_variables(model, shape)
  variables = jax.tree_util.tree_map_with_path(
      lambda p, v: (v + v[:, ::-1]) / 2 if p[-1].key == 'kernel' else v,
      variables)
  x = _images(shape, seed=2)
  x = (x + x[:, :, ::-1]) / 2
  logits, _ = jax.jit(model.apply)(variables, x)
  assert logits.shape == (1, 4, 4, 2)
  np.testing.assert_allclose(logits, logits[:, :, ::-1], rtol=1e-5, atol=1e-5)
  # A top-left crop (an offset of 0 instead of 92) breaks the symmetry.
  assert float(jnp.std(logits)) > 0


def test_original_dropout_in_training():
  model = unet.unet_original(num_classes=2, base_width=2)
  shape = (1, 9, 11, 1)
  variables = fake_variables(model, shape)
  x = _images(shape)
  train = jax.jit(lambda v, k: model.apply(v, x, train=True,
                                           rngs={'dropout': k})[0])
  assert not np.allclose(train(variables, jax.random.key(1)),
                         train(variables, jax.random.key(2)))


def test_original_options():
  assert unet.unet_original(num_classes=2, output_stride=16).base_width == 64
  with pytest.raises(ValueError, match='output_stride=8'):
    unet.unet_original(num_classes=2, output_stride=8)
  with pytest.raises(ValueError, match='frozen_bn'):
    unet.unet_original(num_classes=2, frozen_bn=True)
  with pytest.raises(ValueError, match='num_classes=0'):
    unet.unet_original(num_classes=0)
  with pytest.raises(ValueError, match='base_width=0'):
    unet.unet_original(num_classes=2, base_width=0)
  with pytest.raises(ValueError, match='dropout=1.0'):
    unet.unet_original(num_classes=2, dropout=1.0)
  with pytest.raises(ValueError, match='dtype'):
    unet.unet_original(num_classes=2, dtype='int8')


# --- the padded BatchNorm U-Net ----------------------------------------------

def test_unet_param_count_and_names():
  model = unet.unet(num_classes=21)
  assert (model.depth, model.base_width, model.upsample) == (4, 64,
                                                             'transposed')
  variables = jax.eval_shape(model.init, KEY, jnp.zeros((1, 64, 64, 3)))
  params = variables['params']
  # The paper's layout without conv biases, plus BatchNorm scale and bias.
  assert sum(x.size for x in jax.tree.leaves(params)) == 31_038_933
  expected = {f'enc{i}_{n}{j}' for i in range(5) for j in (1, 2)
              for n in ('conv', 'bn')}
  expected |= {f'dec{i}_{n}{j}' for i in range(4) for j in (1, 2)
               for n in ('conv', 'bn')}
  expected |= {f'dec{i}_upconv' for i in range(4)}
  assert set(params) == expected | {'classifier'}
  assert set(variables['batch_stats']) == {k for k in expected if '_bn' in k}
  assert 'bias' not in params['enc0_conv1']
  assert params['dec0_conv1']['kernel'].shape == (3, 3, 128, 64)


def test_unet_widths_depth_and_bilinear():
  model = unet.unet(num_classes=5, depth=2, base_width=4, upsample='bilinear')
  params = jax.eval_shape(model.init, KEY, jnp.zeros((1, 9, 9, 3)))['params']
  assert not any('upconv' in k for k in params)
  assert 'enc2_conv1' in params and 'enc3_conv1' not in params
  # Bilinear: the concatenation carries the deeper level's channels.
  assert params['dec1_conv1']['kernel'].shape == (3, 3, 16 + 8, 8)


def test_unet_full_size_shapes():
  model = unet.unet(num_classes=21)
  (logits, aux), _ = jax.eval_shape(model.init_with_output, KEY,
                                    jnp.zeros((2, 257, 321, 3)))
  assert logits.shape == (2, 257, 321, 21) and logits.dtype == jnp.float32
  assert aux == {}


@pytest.mark.parametrize('upsample,depth', [('transposed', 4),
                                            ('bilinear', 3)])
def test_unet_tiny_forward_odd_size(upsample, depth):
  shape = (2, 37, 45, 3)
  model = unet.unet(num_classes=5, base_width=4, depth=depth,
                    upsample=upsample, dropout=0.5)
  variables = fake_variables(model, shape)
  x = _images(shape)
  logits, aux = jax.jit(model.apply)(variables, x)
  assert logits.shape == shape[:3] + (5,) and aux == {}
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


def test_unet_bfloat16_compute_float32_params_and_logits():
  model = unet.unet(num_classes=3, base_width=4, dtype='bfloat16')
  logits, variables = jax.eval_shape(
      lambda: model.init_with_output(KEY, jnp.zeros((1, 37, 45, 3))))
  assert logits[0].dtype == jnp.float32
  assert {v.dtype for v in jax.tree.leaves(variables)} == {
      jnp.dtype(jnp.float32)}


def test_unet_options():
  assert unet.unet(num_classes=2, output_stride=8).depth == 3
  assert unet.unet(num_classes=2, depth=3, output_stride=8).depth == 3
  assert unet.unet(num_classes=2, output_stride=16, bn_momentum=0.99,
                   bn_axis_name='batch', frozen_bn=True).frozen_bn
  with pytest.raises(ValueError, match='output_stride=8 and depth=4'):
    unet.unet(num_classes=2, depth=4, output_stride=8)
  with pytest.raises(ValueError, match='output_stride=12'):
    unet.unet(num_classes=2, output_stride=12)
  with pytest.raises(ValueError, match='depth=0'):
    unet.unet(num_classes=2, depth=0)
  with pytest.raises(ValueError, match="upsample='nearest'"):
    unet.unet(num_classes=2, upsample='nearest')
  with pytest.raises(ValueError, match='base_width=-1'):
    unet.unet(num_classes=2, base_width=-1)
  with pytest.raises(ValueError, match='dropout=-0.1'):
    unet.unet(num_classes=2, dropout=-0.1)
