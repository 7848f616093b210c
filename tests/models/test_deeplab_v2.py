"""Tests for DeepLab v2 (flaxseg.models.deeplab_v2).

Full-size models are only traced (`jax.eval_shape`); real forward passes use
tiny widths (ResNet-101 with base_width 2, VGG-16 at 1/16 width) on 37x45
inputs, with variables filled from NumPy.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseg.models import deeplab_v2
from flaxseg.models.deeplab_v2 import (DeepLabV2, VGGBranch,
                                       deeplabv2_resnet101, deeplabv2_vgg16)
from flaxseg.models.layers import FrozenBatchNorm, resize_bilinear

KEY = jax.random.key(0)
SMALL = (2, 37, 45, 3)

# torchvision resnet101 (44,549,160) minus its fc (2048 * 1000 + 1000), and
# torchvision vgg16().features.
RESNET101_BACKBONE = 44_549_160 - 2_049_000
VGG16_CONVS = 14_714_688


def _params(model, shape=(1, 33, 33, 3)):
  return jax.eval_shape(model.init, KEY, jnp.zeros(shape))


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def fake_variables(model, shape, seed=0):
  """Variables of `model` with He-scaled NumPy kernels and identity BN."""
  abstract = _params(model, shape)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      std = np.sqrt(2. / np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.normal(0., std, leaf.shape), leaf.dtype)
    if name in ('scale', 'var'):
      return jnp.ones(leaf.shape, leaf.dtype)
    return jnp.asarray(rng.normal(0., 0.1, leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def tiny_resnet(**kwargs):
  return deeplabv2_resnet101(num_classes=5, base_width=2, **kwargs)


def tiny_vgg(**kwargs):
  kwargs.setdefault('dropout', 0.0)
  return deeplabv2_vgg16(num_classes=5, width_multiplier=0.0625, **kwargs)


def assert_close(actual, desired, rtol=1e-5):
  """Elementwise closeness relative to the largest magnitude of `desired`."""
  desired = np.asarray(desired)
  np.testing.assert_allclose(actual, desired, rtol=0,
                             atol=rtol * float(np.abs(desired).max()))


def _images(seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=SMALL),
                     jnp.float32)


# --- parameter counts and names ----------------------------------------------

def test_resnet101_param_count_matches_caffe_model():
  head = 4 * (3 * 3 * 2048 * 21 + 21)
  assert RESNET101_BACKBONE + head == 44_048_532
  params = _params(deeplabv2_resnet101(num_classes=21))['params']
  assert _count(params) == 44_048_532
  assert _count(params['backbone']) == RESNET101_BACKBONE


@pytest.mark.parametrize('options', [
    {}, {'aspp': 'S'}, {'pool5a': True},
    {'multi_scale_inputs': (1.0, 0.75, 0.5)}])
def test_vgg16_param_count(options):
  branch = (3 * 3 * 512 * 1024 + 1024) + (1024 * 1024 + 1024) + (
      1024 * 21 + 21)
  assert VGG16_CONVS + 4 * branch == 37_877_652
  params = _params(deeplabv2_vgg16(num_classes=21, **options))['params']
  # Rates and scales change no parameter: the scales share one network.
  assert _count(params) == 37_877_652
  assert _count(params['backbone']) == VGG16_CONVS


def test_parameter_names():
  variables = _params(deeplabv2_resnet101(num_classes=21))
  assert set(variables) == {'params', 'batch_stats'}
  params = variables['params']
  assert set(params) == {'backbone'} | {f'aspp_branch{k}' for k in range(4)}
  # Each branch maps 2048 channels straight to class scores: no
  # concatenation and no projection.
  for k in range(4):
    assert jax.tree.map(lambda a: a.shape, params[f'aspp_branch{k}']) == {
        'kernel': (3, 3, 2048, 21), 'bias': (21,)}
  assert params['backbone']['layer3_block22']['conv3']['kernel'].shape == (
      1, 1, 256, 1024)

  variables = _params(deeplabv2_vgg16(num_classes=21))
  assert set(variables) == {'params'}  # VGG-16 has no BatchNorm.
  params = variables['params']
  assert set(params) == {'backbone'} | {f'aspp_branch{k}' for k in range(4)}
  assert jax.tree.map(lambda a: a.shape, params['aspp_branch2']) == {
      'fc6': {'kernel': (3, 3, 512, 1024), 'bias': (1024,)},
      'fc7': {'kernel': (1, 1, 1024, 1024), 'bias': (1024,)},
      'fc8': {'kernel': (1, 1, 1024, 21), 'bias': (21,)}}
  assert 'fc6' not in params['backbone'] and 'conv5_3' in params['backbone']


# --- shapes ------------------------------------------------------------------

@pytest.mark.parametrize('constructor,aspp,scales', [
    (deeplabv2_resnet101, 'L', (1.0, 0.75, 0.5)),
    (deeplabv2_resnet101, 'S', None),
    (deeplabv2_vgg16, 'L', None),
    (deeplabv2_vgg16, 'S', (1.0, 0.75, 0.5)),
])
def test_full_model_shapes(constructor, aspp, scales):
  model = constructor(num_classes=21, aspp=aspp, multi_scale_inputs=scales)
  (logits, aux), _ = jax.eval_shape(model.init_with_output, KEY,
                                    jnp.zeros((2, 257, 321, 3)))
  assert logits.shape == (2, 257, 321, 21) and logits.dtype == jnp.float32
  # Output stride 8: ceil(257 / 8) x ceil(321 / 8).
  assert aux['logits_stride8'].shape == (2, 33, 41, 21)
  if scales is None:
    assert set(aux) == {'logits_stride8'}
  else:
    assert len(aux['scale_logits']) == len(aux['scale_logits_stride8']) == 3
    for s in aux['scale_logits']:
      assert s.shape == logits.shape and s.dtype == jnp.float32
    for s in aux['scale_logits_stride8']:
      assert s.shape == (2, 33, 41, 21)


@pytest.mark.parametrize('make', [tiny_resnet, tiny_vgg])
@pytest.mark.parametrize('aspp', ['L', 'S'])
def test_tiny_forward_sums_branch_scores(make, aspp):
  model = make(aspp=aspp)
  x = _images()
  variables = fake_variables(model, SMALL)
  branch_outputs = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if (context.method_name == '__call__'
        and isinstance(context.module.parent, DeepLabV2)
        and context.module.name.startswith('aspp_branch')):
      branch_outputs.append(out)
    return out

  with nn.intercept_methods(interceptor):
    logits, aux = model.apply(variables, x)
  assert logits.shape == SMALL[:3] + (5,) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits)) and float(jnp.std(logits)) > 0
  assert len(branch_outputs) == 4
  # Stride 8: torch-style floor arithmetic in the ResNet (37 -> 5), Caffe's
  # ceil-mode 3x3 pools in VGG (37 -> 19 -> 10 -> 6).
  size = (5, 6) if make is tiny_resnet else (6, 7)
  for b in branch_outputs:
    assert b.shape == (2,) + size + (5,)
  assert_close(aux['logits_stride8'], sum(branch_outputs))
  assert_close(logits, resize_bilinear(aux['logits_stride8'], SMALL[1:3],
                                       align_corners=True))


def test_multi_scale_fusion_is_max_of_scales():
  # The fusion code is shared by both backbones; VGG is the cheaper one.
  scales = (1.0, 0.75, 0.5)
  model = tiny_vgg(multi_scale_inputs=scales)
  single = tiny_vgg()
  x = _images(2)
  variables = fake_variables(model, SMALL)
  logits, aux = model.apply(variables, x)
  fused = aux['logits_stride8']
  per_scale = aux['scale_logits_stride8']
  np.testing.assert_array_equal(
      fused, jnp.maximum(jnp.maximum(per_scale[0], per_scale[1]),
                         per_scale[2]))
  assert_close(logits, resize_bilinear(fused, SMALL[1:3], align_corners=True))
  # Scales share one network: scale s is the single-scale model on the
  # input resized to floor((n - 1) * s) + 1 pixels, scores then upsampled.
  for s, out, low in zip(scales, aux['scale_logits'], per_scale):
    size = tuple(deeplab_v2.scaled_size(n, s) for n in SMALL[1:3])
    _, ref_aux = single.apply(variables,
                              resize_bilinear(x, size, align_corners=True))
    ref = ref_aux['logits_stride8']
    assert_close(out, resize_bilinear(ref, SMALL[1:3], align_corners=True),
                 rtol=1e-4)
    assert_close(low, resize_bilinear(ref, fused.shape[1:3],
                                      align_corners=True), rtol=1e-4)
  assert not np.allclose(aux['scale_logits'][0], aux['scale_logits'][2])


def test_vgg_dropout_in_training_and_frozen_bn_by_default():
  model = tiny_vgg(dropout=0.5)
  x = _images(3)
  variables = fake_variables(model, SMALL)
  train = lambda v, k: model.apply(v, x, train=True, rngs={'dropout': k})
  a, _ = train(variables, jax.random.key(1))
  b, _ = train(variables, jax.random.key(2))
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(*(model.apply(variables, x)[0],) * 2)

  seen = set()

  def interceptor(next_fun, args, kwargs, context):
    seen.add(type(context.module))
    return next_fun(*args, **kwargs)

  # The Caffe model fine-tunes with BatchNorm frozen.
  with nn.intercept_methods(interceptor):
    _params(tiny_resnet())
  assert FrozenBatchNorm in seen and nn.BatchNorm not in seen


def test_bfloat16_compute_float32_params_and_logits():
  model = deeplabv2_vgg16(num_classes=21, dtype='bfloat16',
                          multi_scale_inputs=(1.0, 0.5))
  (logits, aux), variables = jax.eval_shape(
      model.init_with_output, KEY, jnp.zeros((1, 65, 65, 3)))
  assert logits.dtype == aux['logits_stride8'].dtype == jnp.float32
  assert {v.dtype for v in jax.tree.leaves(variables)} == {
      jnp.dtype(jnp.float32)}


# --- configuration -----------------------------------------------------------

@pytest.mark.parametrize('options,rates', [
    ({}, (6, 12, 18, 24)),
    ({'aspp': 'S'}, (2, 4, 8, 12)),
    ({'output_stride': 16}, (3, 6, 9, 12)),
    ({'output_stride': 16, 'aspp': 'S'}, (1, 2, 4, 6)),
    ({'aspp_rates': [1, 2, 3, 4]}, (1, 2, 3, 4)),
])
def test_aspp_rates(options, rates):
  model = deeplabv2_resnet101(num_classes=21, **options)
  assert model.aspp_rates == rates
  if 'output_stride' not in options:
    assert deeplabv2_vgg16(num_classes=21, **options).aspp_rates == rates


def test_defaults():
  model = deeplabv2_resnet101(num_classes=21)
  assert (model.backbone, model.depth, model.output_stride, model.frozen_bn,
          model.multi_scale_inputs, model.align_corners) == (
              'resnet', 101, 8, True, None, True)
  model = deeplabv2_vgg16(num_classes=21, multi_scale_inputs=[1, 0.75, 0.5])
  assert (model.backbone, model.fc_width, model.dropout) == ('vgg16', 1024,
                                                              0.5)
  assert model.multi_scale_inputs == deeplab_v2.PAPER_SCALES


def test_scaled_size_follows_caffe_interp():
  assert [deeplab_v2.scaled_size(321, s) for s in (1.0, 0.75, 0.5)] == [
      321, 241, 161]
  assert deeplab_v2.scaled_size(257, 0.75) == 193
  assert deeplab_v2.scaled_size(1, 0.5) == 1


@pytest.mark.parametrize('constructor,options,match', [
    (deeplabv2_resnet101, {'aspp': 'XL'}, "aspp='XL'"),
    (deeplabv2_vgg16, {'aspp': 'l'}, "aspp='l'"),
    (deeplabv2_resnet101, {'aspp_rates': (6, 12, 18)}, 'aspp_rates'),
    (deeplabv2_vgg16, {'aspp_rates': (6, 12, 18, 0)}, 'aspp_rates'),
    (deeplabv2_vgg16, {'aspp_rates': 'abcd'}, 'aspp_rates'),
    (deeplabv2_resnet101, {'multi_scale_inputs': (0.75, 0.5)},
     'multi_scale_inputs'),
    (deeplabv2_vgg16, {'multi_scale_inputs': (1.0, 1.0)},
     'multi_scale_inputs'),
    (deeplabv2_vgg16, {'multi_scale_inputs': (1.0, -0.5)},
     'multi_scale_inputs'),
    (deeplabv2_resnet101, {'output_stride': 4}, 'output_stride=4'),
    (deeplabv2_resnet101, {'output_stride': 32}, 'rate 6'),
    (deeplabv2_vgg16, {'output_stride': 16}, 'output_stride=16'),
    (deeplabv2_resnet101, {'base_width': 0}, 'base_width=0'),
    (deeplabv2_vgg16, {'width_multiplier': 0}, 'width_multiplier'),
    (deeplabv2_vgg16, {'fc_width': 0}, 'fc_width=0'),
    (deeplabv2_vgg16, {'dropout': 1.0}, 'dropout'),
    (deeplabv2_resnet101, {'num_classes': 0}, 'num_classes=0'),
    (deeplabv2_vgg16, {'dtype': 'int8'}, 'dtype'),
])
def test_bad_options_are_named(constructor, options, match):
  options.setdefault('num_classes', 21)
  with pytest.raises(ValueError, match=match):
    constructor(**options)


def test_common_kwargs_accepted():
  common = dict(dtype='float32', bn_momentum=0.99, bn_axis_name='batch',
                frozen_bn=False)
  assert isinstance(deeplabv2_resnet101(num_classes=3, output_stride=16,
                                        **common), DeepLabV2)
  assert isinstance(deeplabv2_vgg16(num_classes=3, output_stride=8,
                                    **common), DeepLabV2)
  assert VGGBranch(num_classes=3, rate=2).width == 1024
