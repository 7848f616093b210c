"""Dense-CRF post-processing in evaluation (DeepLab v1/v2, config.eval.crf).

Covers: masked CRF on padded images equals the CRF on the cropped images
(exact, window and permutohedral backends), the denormalisation, eval_step
with the CRF against dense_crf on the cropped images (jit, pmap and
shard_map on two simulated devices), and a trainer run with the CRF on that
writes both scores.
"""

import os
import subprocess
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseg.crf import meanfield as M
from flaxseg import inference
from flaxseg.train import step as step_lib


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
H, W, L = 14, 18, 3
SIZES = ((9, 13), (14, 11))     # (height, width) of the two images
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CRF = {'num_iterations': 4, 'backend': 'exact', 'bi_w': 5.0,
       'bi_xy_std': 10.0, 'bi_rgb_std': 13.0, 'pos_w': 3.0, 'pos_xy_std': 3.0}


def padded_batch(seed=0):
  """Two uint8 images padded (bottom/right) as the eval pipeline pads them.

  Returns:
    ``(raw, images, logits, labels, mask)``: raw colours (padding = the mean
    colour), normalised images (padding exactly 0), logits that are random
    everywhere (the padding's too), labels (255 in the padding), mask.
  """
  rng = np.random.default_rng(seed)
  raw = rng.integers(0, 256, (2, H, W, 3)).astype(np.float32)
  # Two colour regions per image, so the appearance kernel matters.
  raw[:, :, :W // 2] = np.clip(raw[:, :, :W // 2] * 0.3 + 150, 0, 255)
  raw = np.round(raw)
  images = (raw / 255.0 - np.asarray(MEAN)) / np.asarray(STD)
  mask = np.zeros((2, H, W), bool)
  labels = rng.integers(0, L, (2, H, W)).astype(np.int32)
  for i, (h, w) in enumerate(SIZES):
    mask[i, :h, :w] = True
  images = np.where(mask[..., None], images, 0.0).astype(np.float32)
  raw = np.where(mask[..., None], raw, np.round(np.asarray(MEAN) * 255.0))
  labels = np.where(mask, labels, 255)
  logits = rng.normal(scale=1.5, size=(2, H, W, L)).astype(np.float32)
  return raw.astype(np.float32), images, logits, labels, mask


def crf_kwargs(backend):
  return dict(num_iterations=4, backend=backend,
              smoothness=M.GaussianKernel(sxy=3.0, weight=3.0),
              appearance=M.BilateralKernel(sxy=10.0, srgb=13.0, weight=5.0))


@pytest.mark.parametrize('backend,include_self,normalization,atol', [
    ('exact', True, 'symmetric', 5e-6), ('exact', False, 'symmetric', 5e-6),
    ('exact', True, 'after', 5e-6), ('exact', True, 'none', 5e-6),
    ('window', True, 'symmetric', 5e-6),
    ('permutohedral', True, 'symmetric', 2e-5),
    ('permutohedral', True, 'after', 2e-5)])
def test_masked_crf_equals_cropped_crf(backend, include_self, normalization,
                                       atol):
  raw, _, logits, _, mask = padded_batch()
  kwargs = dict(crf_kwargs(backend), include_self=include_self,
                normalization=normalization)
  if backend == 'window':
    kwargs['window_size'] = 2 * W - 1   # the whole image: exact on it
  # Jitted: eager lattice builds run op by op, several times slower here.
  crf = jax.jit(lambda l, i, m=None: M.dense_crf(l, i, mask=m, **kwargs))
  masked = crf(logits, raw, mask)
  plain = crf(logits, raw)
  for i, (h, w) in enumerate(SIZES):
    cropped = crf(logits[i:i + 1, :h, :w], raw[i:i + 1, :h, :w])[0]
    np.testing.assert_allclose(masked[i, :h, :w], cropped, atol=atol, rtol=0)
    if (h < H or w < W) and normalization != 'none':
      # Without the mask the padding leaks into the valid region (unnormalised
      # messages this strong saturate Q either way).
      assert np.abs(plain[i, :h, :w] - cropped).max() > 1e-3
  # Outside the mask: the unary alone.
  np.testing.assert_allclose(
      np.where(mask[..., None], 0.0, masked),
      np.where(mask[..., None], 0.0, jax.nn.softmax(logits)), atol=1e-6)


def test_masked_crf_under_jit_and_fully_masked_image():
  raw, _, logits, _, mask = padded_batch()
  mask[1] = False    # a dummy example that only fills the batch
  crf = jax.jit(lambda l, i, m: M.dense_crf(l, i, mask=m,
                                            **crf_kwargs('permutohedral')))
  q = crf(logits, raw, mask)
  assert np.all(np.isfinite(q))
  np.testing.assert_allclose(q[1], jax.nn.softmax(logits[1]), atol=1e-6)


def test_denormalize_recovers_uint8_colours():
  raw, images, _, _, mask = padded_batch()
  back = inference.denormalize(images, MEAN, STD)
  np.testing.assert_array_equal(back, raw)
  assert back.min() >= 0 and back.max() <= 255
  np.testing.assert_array_equal(
      inference.image_mask(np.asarray([h for h, _ in SIZES]),
                          np.asarray([w for _, w in SIZES]), (H, W)), mask)


def fake_state(logits):
  """A stand-in TrainState whose model returns ``logits``."""
  return types.SimpleNamespace(
      variables={}, apply_fn=lambda v, x, train: (jnp.asarray(logits), {}))


def eval_batch():
  _, images, logits, labels, _ = padded_batch()
  batch = {'image': images, 'label': labels,
           'valid': np.asarray([True, True]),
           'height': np.asarray([h for h, _ in SIZES], np.int32),
           'width': np.asarray([w for _, w in SIZES], np.int32)}
  return batch, logits


def test_eval_step_crf_equals_crf_on_cropped_images():
  batch, logits = eval_batch()
  out = jax.jit(lambda b: step_lib.eval_step(
      fake_state(logits), b, axis_name=None, num_classes=L, crf=CRF,
      mean=MEAN, std=STD))(batch)
  plain = step_lib.eval_step(fake_state(logits), batch, axis_name=None,
                             num_classes=L)
  np.testing.assert_array_equal(out['confusion_no_crf'], plain['confusion'])
  raw = inference.denormalize(batch['image'], MEAN, STD)
  expected_cm = np.zeros((L, L), np.int64)
  for i, (h, w) in enumerate(SIZES):
    q = M.dense_crf(logits[i:i + 1, :h, :w], raw[i:i + 1, :h, :w],
                    **crf_kwargs('exact'))[0]
    pred = np.argmax(q, -1)
    np.testing.assert_array_equal(out['prediction'][i, :h, :w], pred)
    np.add.at(expected_cm, (batch['label'][i, :h, :w].ravel(),
                            pred.ravel()), 1)
  np.testing.assert_array_equal(out['confusion'], expected_cm)
  assert not np.array_equal(out['confusion'], plain['confusion'])


def test_eval_step_crf_under_pmap_and_shard_map(tmp_path):
  """Two simulated devices, one image each: the same numbers as one device."""
  script = textwrap.dedent(f'''
      import functools, sys, types
      import jax
      jax.config.update('jax_num_cpu_devices', 2)
      import jax.numpy as jnp
      import numpy as np
      sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
      from test_postprocess import CRF, L, MEAN, STD, eval_batch, fake_state
      from flaxseg.train import parallel, step as step_lib
      batch, logits = eval_batch()
      crf = dict(CRF, backend='permutohedral')
      fn = functools.partial(step_lib.eval_step, num_classes=L, crf=crf,
                             mean=MEAN, std=STD)
      single = jax.jit(lambda b: fn(fake_state(logits), b, axis_name=None))(
          batch)
      kinds = {{'confusion': parallel.REPLICATED,
                'confusion_no_crf': parallel.REPLICATED,
                'prediction': parallel.SHARDED}}
      for mode in ('pmap', 'shard_map'):
        dp = parallel.DataParallel(mode)
        assert dp.num_devices == 2
        # The per-shard model returns its own image's logits.
        def per_shard(params, b, axis_name):
          i = jax.lax.axis_index(axis_name)
          own = jax.lax.dynamic_slice_in_dim(params, i, 1)
          return fn(fake_state(own), b, axis_name=axis_name)
        out = dp.map(per_shard, kinds)(dp.put_state(logits),
                                       dp.put_batch(batch))
        for key in ('confusion', 'confusion_no_crf'):
          np.testing.assert_array_equal(dp.fetch(out[key]), single[key])
        np.testing.assert_array_equal(
            dp.fetch(out['prediction'], parallel.SHARDED), single['prediction'])
      print('OK')
      ''')
  proc = subprocess.run([sys.executable, '-c', script], capture_output=True,
                        text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0 and 'OK' in proc.stdout, proc.stderr[-3000:]
