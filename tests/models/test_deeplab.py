"""Tests for DeepLab v3, ASPP and the model registry.

Full-size models are only traced (`jax.eval_shape`); real forward passes use
ResNet-18 with base_width 8 on small odd inputs, with variables filled from
NumPy (random init under jit costs more than the forward pass on CPU).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseg.models import create_model, list_models, layers
from flaxseg.models.aspp import ASPP, scale_rates
from flaxseg.models.deeplab import DeepLabV3
from model_testing import KEY, fake_variables, num_params as _num_params


def tiny(**kwargs):
  kwargs.setdefault('base_width', 8)
  kwargs.setdefault('aspp_width', 16)
  return create_model('deeplabv3_resnet18', num_classes=5, **kwargs)


# --- torchvision parity ------------------------------------------------------

@pytest.mark.parametrize('name,aux,count', [
    ('deeplabv3_resnet50_tv', False, 39_638_869),
    ('deeplabv3_resnet50_tv', True, 42_004_074),
    ('deeplabv3_resnet101_tv', False, 58_630_997),
    ('deeplabv3_resnet101_tv', True, 60_996_202),
])
def test_torchvision_param_counts(name, aux, count):
  assert _num_params(create_model(name, num_classes=21, aux=aux)) == count


def test_paper_variant_is_tv_minus_head_conv():
  # Same backbone and ASPP; the paper head has no 3x3 conv + BN (589,824 +
  # 512 parameters). Multi-grid and rates change no parameter count.
  paper = _num_params(create_model('deeplabv3_resnet50', num_classes=21))
  assert paper == 39_638_869 - 589_824 - 512


def test_parameter_names():
  model = create_model('deeplabv3_resnet50_tv', num_classes=21, aux=True)
  variables = jax.eval_shape(model.init, KEY, jnp.zeros((1, 64, 64, 3)))
  params = variables['params']
  assert set(variables) == {'params', 'batch_stats'}
  assert set(params) == {'backbone', 'aspp', 'head_conv', 'head_bn',
                         'classifier', 'aux_conv', 'aux_bn', 'aux_classifier'}
  assert set(params['aspp']) == {
      f'{b}_{l}' for b in ('conv1x1', 'atrous0', 'atrous1', 'atrous2', 'pool',
                           'project') for l in ('conv', 'bn')}
  assert params['aspp']['project_conv']['kernel'].shape == (1, 1, 1280, 256)
  assert set(params['classifier']) == {'kernel', 'bias'}
  assert 'bias' not in params['head_conv']
  assert params['aux_conv']['kernel'].shape == (3, 3, 1024, 256)
  assert params['backbone']['layer4_block2']['conv3']['kernel'].shape == (
      1, 1, 512, 2048)


# --- shapes ------------------------------------------------------------------

@pytest.mark.parametrize('name', ['deeplabv3_resnet50', 'deeplabv3_resnet101',
                                  'deeplabv3_resnet50_tv'])
@pytest.mark.parametrize('output_stride', [8, 16, 32])
def test_full_model_shapes(name, output_stride):
  model = create_model(name, num_classes=21, output_stride=output_stride,
                       aux=True)
  (logits, aux), _ = jax.eval_shape(model.init_with_output, KEY,
                                    jnp.zeros((2, 257, 321, 3)))
  assert logits.shape == (2, 257, 321, 21) and logits.dtype == jnp.float32
  assert aux['aux_logits'].shape == (2, 257, 321, 21)


def test_tiny_forward_all_strides():
  shape = (2, 65, 97, 3)
  x = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)
  variables = None
  for output_stride in (8, 16, 32):
    model = tiny(output_stride=output_stride, aux=True)
    # Parameter shapes do not depend on the output stride.
    variables = variables or fake_variables(model, shape)
    logits, aux = jax.jit(model.apply)(variables, x)
    assert logits.shape == shape[:3] + (5,) and logits.dtype == jnp.float32
    assert aux['aux_logits'].shape == logits.shape
    assert np.all(np.isfinite(logits)) and float(jnp.std(logits)) > 0


def test_train_step_updates_stats_and_uses_dropout():
  model = tiny(aspp_dropout=0.5)
  shape = (2, 33, 33, 3)
  variables = fake_variables(model, shape)
  x = jnp.asarray(np.random.default_rng(2).normal(size=shape), jnp.float32)

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
  with pytest.raises(Exception, match='dropout'):  # Needs the 'dropout' rng.
    jax.eval_shape(lambda v: model.apply(v, x, train=True,
                                         mutable=['batch_stats']), variables)


def test_bfloat16_compute_float32_params_and_logits():
  model = create_model('deeplabv3_resnet50_tv', num_classes=21,
                       dtype='bfloat16', aux=True)
  conv_dtypes = set()

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, (nn.Conv, nn.BatchNorm)):
      conv_dtypes.add(out.dtype)
    return out

  with nn.intercept_methods(interceptor):
    (logits, aux), variables = jax.eval_shape(
        model.init_with_output, KEY, jnp.zeros((1, 65, 65, 3)))
  assert conv_dtypes == {jnp.dtype(jnp.bfloat16)}
  assert logits.dtype == aux['aux_logits'].dtype == jnp.float32
  assert {v.dtype for v in jax.tree.leaves(variables)} == {
      jnp.dtype(jnp.float32)}


def test_frozen_bn_zero_grads_and_fixed_stats():
  model = tiny(frozen_bn=True, aux=True)
  shape = (2, 33, 33, 3)
  variables = fake_variables(model, shape)
  x = jnp.asarray(np.random.default_rng(3).normal(size=shape), jnp.float32)

  @jax.jit
  def grads_and_stats(params):
    def loss(params):
      (logits, aux), updates = model.apply(
          {'params': params, 'batch_stats': variables['batch_stats']}, x,
          train=True, mutable=['batch_stats'],
          rngs={'dropout': jax.random.key(0)})
      return jnp.mean(logits ** 2) + jnp.mean(aux['aux_logits'] ** 2), updates
    return jax.grad(loss, has_aux=True)(params)

  grads, updates = grads_and_stats(variables['params'])
  flat = {'/'.join(k.key for k in path): g for path, g in
          jax.tree_util.tree_leaves_with_path(grads)}
  bn = [p for p in flat if 'bn' in p.split('/')[-2]]
  assert len(bn) > 20
  for path in bn:
    np.testing.assert_array_equal(flat[path], 0., err_msg=path)
  assert float(jnp.abs(flat['classifier/kernel']).sum()) > 0
  assert float(jnp.abs(flat['backbone/conv1/kernel']).sum()) > 0
  jax.tree.map(np.testing.assert_array_equal, updates['batch_stats'],
               variables['batch_stats'])


# --- configuration -----------------------------------------------------------

@pytest.mark.parametrize('name,output_stride,rates', [
    ('deeplabv3_resnet50', 16, (6, 12, 18)),
    ('deeplabv3_resnet50', 8, (12, 24, 36)),
    ('deeplabv3_resnet50', 32, (3, 6, 9)),
    ('deeplabv3_resnet50_tv', 8, (12, 24, 36)),
    ('deeplabv3_resnet50_tv', 16, (6, 12, 18)),
])
def test_default_aspp_rates(name, output_stride, rates):
  model = create_model(name, num_classes=21, output_stride=output_stride)
  assert model.aspp_rates == rates


def test_variant_defaults():
  paper = create_model('deeplabv3_resnet101', num_classes=21)
  assert (paper.output_stride, paper.multi_grid, paper.head_conv, paper.aux,
          paper.bn_momentum, paper.aspp_width) == (16, (1, 2, 4), False, False,
                                                   0.9997, 256)
  tv = create_model('deeplabv3_resnet101_tv', num_classes=21)
  assert (tv.output_stride, tv.multi_grid, tv.head_conv, tv.aspp_dropout,
          tv.bn_momentum) == (8, None, True, 0.5, 0.9)
  custom = create_model('deeplabv3_resnet34', num_classes=3, dtype='bfloat16',
                        aspp_rates=[2, 4, 6], multi_grid=[1, 2],
                        bn_axis_name='batch')
  assert custom.dtype == jnp.bfloat16 and custom.aspp_rates == (2, 4, 6)
  assert custom.multi_grid == (1, 2) and custom.bn_axis_name == 'batch'


def test_scale_rates():
  assert scale_rates((6, 12, 18), 16, 8) == (12, 24, 36)
  with pytest.raises(ValueError, match='rate 6'):
    scale_rates((6, 12, 18), 16, 64)


def test_aspp_pool_branch_is_global():
  # A change confined to one corner of the input moves every output pixel
  # only through the image-pooling branch when the atrous rate exceeds the map.
  aspp = ASPP(rates=(40, 40, 40), width=4, dropout=0.)
  x = jnp.zeros((1, 5, 5, 2))
  variables = fake_variables(aspp, x.shape)
  y0 = aspp.apply(variables, x)
  y1 = aspp.apply(variables, x.at[0, 0, 0].set(3.))
  assert y0.shape == (1, 5, 5, 4)
  assert bool(jnp.all(jnp.any(y0 != y1, axis=-1)[0, 1:, 1:]))


# --- registry ----------------------------------------------------------------

def test_registry_lists_models():
  assert {'deeplabv3_resnet18', 'deeplabv3_resnet34', 'deeplabv3_resnet50',
          'deeplabv3_resnet101', 'deeplabv3_resnet50_tv',
          'deeplabv3_resnet101_tv'} <= set(list_models())
  assert isinstance(create_model('deeplabv3_resnet18', num_classes=2),
                    DeepLabV3)


def test_registry_errors():
  with pytest.raises(ValueError, match="'deeplabv9'.*deeplabv3_resnet50"):
    create_model('deeplabv9', num_classes=21)
  with pytest.raises(ValueError, match="'outptu_stride'.*output_stride"):
    create_model('deeplabv3_resnet50', num_classes=21, outptu_stride=8)
  with pytest.raises(ValueError, match='output_stride=4'):
    create_model('deeplabv3_resnet50', num_classes=21, output_stride=4)
  with pytest.raises(ValueError, match='num_classes=0'):
    create_model('deeplabv3_resnet50', num_classes=0)
  with pytest.raises(ValueError, match='dtype'):
    create_model('deeplabv3_resnet50', num_classes=21, dtype='int8')
  with pytest.raises(ValueError, match='aspp_rates'):
    create_model('deeplabv3_resnet50', num_classes=21, aspp_rates=(1, 2))


def test_trainer_kwargs_accepted_by_every_model():
  # The trainer always passes these two (flaxseg.train.loop.build_model).
  for name in list_models():
    assert isinstance(create_model(name, num_classes=3, dtype='float32',
                                   bn_axis_name=None), nn.Module)


def test_common_kwargs_accepted_by_every_resnet_model():
  common = dict(dtype='float32', output_stride=16, bn_momentum=0.99,
                bn_axis_name=None, frozen_bn=False)
  names = [n for n in list_models() if 'resnet' in n]
  assert len(names) >= 10
  for name in names:
    assert isinstance(create_model(name, num_classes=3, **common), nn.Module)


def test_frozen_bn_uses_frozen_module_everywhere():
  seen = set()

  def interceptor(next_fun, args, kwargs, context):
    seen.add(type(context.module))
    return next_fun(*args, **kwargs)

  model = create_model('deeplabv3_resnet18', num_classes=3, frozen_bn=True,
                       aux=True)
  with nn.intercept_methods(interceptor):
    jax.eval_shape(model.init, KEY, jnp.zeros((1, 33, 33, 3)))
  assert layers.FrozenBatchNorm in seen and nn.BatchNorm not in seen


def test_bn_axis_name_gives_full_batch_statistics():
  # vmap with an axis name stands in for pmap / shard_map: with bn_axis_name
  # the running statistics of 2 shards of 2 equal those of one batch of 4.
  aspp = ASPP(rates=(1, 2, 3), width=4, dropout=0., bn_momentum=0.)
  x = jnp.asarray(np.random.default_rng(4).normal(size=(4, 5, 5, 3)),
                  jnp.float32)
  variables = fake_variables(aspp, x.shape)
  _, full = aspp.apply(variables, x, train=True, mutable=['batch_stats'])
  synced = aspp.clone(bn_axis_name='shards')
  _, sharded = jax.vmap(
      lambda xs: synced.apply(variables, xs, train=True,
                              mutable=['batch_stats']),
      axis_name='shards')(x.reshape(2, 2, 5, 5, 3))
  jax.tree.map(lambda f, s: np.testing.assert_allclose(s[0], f, rtol=1e-5,
                                                       atol=1e-6),
               full['batch_stats'], sharded['batch_stats'])


def test_remat_keeps_names_loss_and_gradients():
  x = jax.random.normal(KEY, (2, 17, 17, 3))
  results = []
  for remat in (False, True):
    model = create_model('deeplabv3_resnet18', num_classes=3, base_width=4,
                         aspp_width=8, aspp_dropout=0.0, remat=remat)
    variables = jax.jit(model.init)(KEY, x)   # eager init is slow

    def loss(params):
      (logits, _), _ = model.apply(
          {'params': params, 'batch_stats': variables['batch_stats']}, x,
          train=True, mutable=['batch_stats'])
      return jnp.mean(logits ** 2)

    results.append((variables, jax.jit(jax.value_and_grad(loss))(
        variables['params'])))
  (v0, (l0, g0)), (v1, (l1, g1)) = results
  assert jax.tree.structure(v0) == jax.tree.structure(v1)
  assert float(l0) == float(l1)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
