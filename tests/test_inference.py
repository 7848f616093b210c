"""Inference modes (flaxseg.inference) on small hand-made networks.

The networks here are tiny closed-form functions, so each mode can be checked
against what it must compute: a plain mode returns the network's logits
bit for bit, flips are undone (an input that is not left/right symmetric), the
sliding window equals a crop-by-crop reference, and scales resize back to the
input. The same modes on a trained model are covered in test_predict_export.py.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flaxseg import inference
from flaxseg.config import default_config, validate_config

L = 3


def conv_net(variables, images, train=False):
  """A 3x3 convolution ('SAME'): local context, left/right asymmetric."""
  del train
  out = jax.lax.conv_general_dilated(
      images, variables['kernel'], (1, 1), 'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return out, {}


def context_net(variables, images, train=False):
  """Pixel term plus the input's global mean: depends on the whole crop."""
  del train
  local = images @ variables['w']
  return local + jnp.mean(local, axis=(1, 2), keepdims=True), {}


def ramp_net(variables, images, train=False):
  """A per-pixel term plus the column index: not flip-equivariant."""
  del train
  local = images @ variables['w']
  cols = jnp.arange(images.shape[2], dtype=jnp.float32)[None, None, :, None]
  return local + cols, {}


@pytest.fixture(scope='module')
def variables():
  rng = np.random.RandomState(0)
  return {'kernel': jnp.asarray(rng.randn(3, 3, 3, L), jnp.float32),
          'w': jnp.asarray(rng.randn(3, L), jnp.float32)}


@pytest.fixture(scope='module')
def images():
  # Not symmetric left/right: a flip that is not undone shows.
  return jnp.asarray(np.random.RandomState(1).randn(2, 13, 17, 3), jnp.float32)


def run(net, variables, images, **kwargs):
  settings = inference.Settings(**kwargs)
  return np.asarray(jax.jit(lambda v, x: inference.segment_logits(
      net, v, x, settings))(variables, images))


def test_plain_modes_return_the_network_logits_exactly(variables, images):
  ref = np.asarray(jax.jit(lambda v, x: conv_net(v, x)[0])(variables, images))
  # One scale of 1.0, no flip (either merge), and windows that cover it all.
  for kwargs in ({}, {'merge': 'logits'}, {'scales': (1.0,), 'flip': False},
                 {'window': (13, 17)}, {'window': (64, 64)}):
    np.testing.assert_array_equal(run(conv_net, variables, images, **kwargs),
                                  ref, err_msg=str(kwargs))


def test_repeated_scale_averages_to_the_same_logits(variables, images):
  ref = run(conv_net, variables, images)
  got = run(conv_net, variables, images, scales=(1.0, 1.0), merge='logits')
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
  probs = run(conv_net, variables, images, scales=(1.0, 1.0), merge='probs')
  np.testing.assert_allclose(jax.nn.softmax(probs), jax.nn.softmax(ref),
                             atol=1e-6)


def test_flip_is_undone(variables, images):
  f = lambda x: np.asarray(conv_net(variables, x)[0])
  want = (f(images) + f(images[:, :, ::-1])[:, :, ::-1]) / 2
  got = run(conv_net, variables, images, flip=True, merge='logits')
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The column ramp averages to its mean, (W - 1) / 2, everywhere: a flip
  # that were not mirrored back (or mirrored on the wrong axis) would not.
  local = np.asarray(images @ variables['w'])
  local_flipped = np.asarray(images[:, :, ::-1] @ variables['w'])[:, :, ::-1]
  got = run(ramp_net, variables, images, flip=True, merge='logits')
  np.testing.assert_allclose(got, (local + local_flipped) / 2 + 8.0,
                             rtol=1e-5, atol=1e-5)
  # merge='probs' returns the log of the mean probabilities.
  got = run(conv_net, variables, images, flip=True)
  want = np.log((jax.nn.softmax(f(images)) +
                 jax.nn.softmax(f(images[:, :, ::-1]))[:, :, ::-1]) / 2)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('size,scale,align,want', [
    (513, 0.5, True, 257), (513, 0.75, True, 385), (513, 1.75, True, 897),
    (500, 0.5, True, 250), (333, 0.5, False, 167), (333, 1.25, False, 416),
    (33, 0.25, False, 8), (3, 0.1, True, 1)])
def test_scaled_size(size, scale, align, want):
  # TF DeepLab's scale_dimension: int((d - 1) * s + 1) with align_corners.
  assert inference.scaled_size((size, size), scale, align) == (want, want)


def test_scales_resize_back_to_the_input(variables, images):
  from flaxseg.models.layers import resize_bilinear
  f = lambda x: np.asarray(conv_net(variables, x)[0])
  for align in (False, True):
    half = resize_bilinear(images, inference.scaled_size((13, 17), 0.5, align),
                           align)
    want = (f(images) + np.asarray(resize_bilinear(f(half), (13, 17),
                                                   align))) / 2
    got = run(conv_net, variables, images, scales=(1.0, 0.5), merge='logits',
              align_corners=align)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('size,window,stride,want', [
    # mmsegmentation's grid: rows every stride, the last one flush.
    ((10, 10), (4, 4), (3, 3), [0, 3, 6]),
    ((11, 10), (4, 4), (3, 3), [0, 3, 6, 7]),
    ((4, 4), (8, 8), (5, 5), [0]),
])
def test_window_grid(size, window, stride, want):
  corners, crop = inference.window_grid(size, window, stride)
  assert sorted({y for y, _ in corners}) == want
  assert crop == tuple(min(w, s) for w, s in zip(window, size))
  counts = inference.window_counts(size, corners, crop)
  assert counts.min() >= 1      # every pixel is covered


def test_sliding_window_matches_crop_by_crop_reference(variables, images):
  window, stride = (8, 10), (5, 6)
  got = run(context_net, variables, images, window=window, stride=stride)
  corners, (ch, cw) = inference.window_grid((13, 17), window, stride)
  total = np.zeros((2, 13, 17, L))
  count = np.zeros((13, 17, 1))
  for y, x in corners:
    crop = images[:, y:y + ch, x:x + cw]
    total[:, y:y + ch, x:x + cw] += np.asarray(context_net(variables, crop)[0])
    count[y:y + ch, x:x + cw] += 1
  np.testing.assert_allclose(got, total / count, rtol=1e-5, atol=1e-5)
  # The window changes this network's answer (it sees only its crop).
  whole = run(context_net, variables, images)
  assert np.abs(got - whole).max() > 1e-3


def test_window_with_scales_and_flip_compose(variables, images):
  got = run(conv_net, variables, images, window=(8, 8), scales=(1.0,),
            flip=True, merge='logits')
  # A 3x3 conv with SAME padding differs from whole-image only at crop
  # borders inside the image; so compare against the composed definition.
  f = lambda x: np.asarray(jax.jit(lambda v, y: inference.sliding_logits(
      conv_net, v, y, (8, 8)))(variables, x))
  want = (f(images) + f(images[:, :, ::-1])[:, :, ::-1]) / 2
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_settings_errors_name_the_values():
  with pytest.raises(ValueError, match='scales'):
    inference.Settings(scales=(0.0,))
  with pytest.raises(ValueError, match='merge'):
    inference.Settings(merge='max')
  with pytest.raises(ValueError, match='window'):
    inference.Settings(window=(3,))


@pytest.mark.parametrize('key,value', [
    ('scales', ()), ('scales', (1.0, -0.5)), ('flip', 'yes'),
    ('merge', 'max'), ('window', -3), ('window', (5, 0)), ('window', (5,)),
    ('window_stride', 'x'), ('output_stride', 12)])
def test_config_validation_names_the_key(key, value):
  c = default_config()
  c.model.name = 'unet'
  # A new section: ConfigDict refuses a value of another type in place.
  c.eval = ml_collections.ConfigDict({**c.eval.to_dict(), key: value})
  with pytest.raises(ValueError, match=f'config.eval.{key}'):
    validate_config(c)


def test_settings_from_config():
  c = default_config().eval
  c.scales = (0.5, 1.0)
  c.flip = True
  c.window = (321, 321)
  s = inference.settings_from_config(c, align_corners=True)
  assert s == inference.Settings(scales=(0.5, 1.0), flip=True, merge='probs',
                                 window=(321, 321), stride=None,
                                 align_corners=True)
  c.window, c.window_stride = (100, 200), (50, 60)
  s = inference.settings_from_config(c)
  assert s.window == (100, 200) and s.stride == (50, 60)
