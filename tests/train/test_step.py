"""Tests for the pure train/eval steps on one device."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flaxseg


def _state(dtype):
  model = flaxseg.create_model('deeplabv3_resnet18', num_classes=3,
                               base_width=4, aspp_width=8, aspp_dropout=0.0,
                               output_stride=16, dtype=dtype)
  return flaxseg.create_train_state(model, optax.sgd(0.01),
                                    jax.random.key(0), (1, 33, 33, 3))


@pytest.fixture(scope='module')
def batch():
  rng = np.random.default_rng(0)
  label = rng.integers(0, 3, (2, 33, 33)).astype(np.int32)
  label[0, :4] = 255
  return {'image': jnp.asarray(rng.normal(size=(2, 33, 33, 3)), jnp.float32),
          'label': jnp.asarray(label)}


def test_bf16_tracks_float32(batch):
  """bf16 compute, float32 master weights: the loss and its gradient at
  initialisation stay close to float32's.

  Measured on this tiny random net (BN over the 3x3 maps of two images,
  where bf16's 8-bit mantissa shows most): the losses 1.2% apart and a
  gradient cosine of 0.952 on XLA:CPU; 2.2% and 0.928 on an H200 (jax
  0.11.2, cuDNN convolutions, float32 there meaning TF32; 2026-12-04).
  """
  out = {}
  for dtype in ('float32', 'bfloat16'):
    state = _state(dtype)

    def loss_fn(params, state=state):
      (logits, _), _ = state.apply_fn(
          {'params': params, 'batch_stats': state.batch_stats},
          batch['image'], train=True, mutable=['batch_stats'])
      return flaxseg.segmentation_loss(logits, batch['label'])
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(state.params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    out[dtype] = (float(loss), jnp.concatenate(
        [g.reshape(-1) for g in jax.tree.leaves(grads)]))
  (l32, g32), (l16, g16) = out['float32'], out['bfloat16']
  np.testing.assert_allclose(l16, l32, rtol=3e-2)
  cosine = float(g16 @ g32 / (jnp.linalg.norm(g16) * jnp.linalg.norm(g32)))
  assert cosine > 0.9, cosine


def test_bf16_training_tracks_float32():
  """A short bf16 training run follows the float32 one step by step, with
  float32 parameters throughout.

  The task is learnable (three stripes per image, each of a random class
  that the image shows as its colour), so the loss falls far below its
  start, not only to the class prior. On XLA:CPU the runs go from 1.77 to
  0.23 (float32) and 0.25 (bfloat16) in 25 Adam steps, on average 1.5% of
  the initial loss apart and 0.9% at the end.
  """
  rng = np.random.default_rng(1)
  classes = rng.integers(0, 3, (4, 3))
  label = np.repeat(np.repeat(classes, 11, axis=1)[:, None, :], 33, axis=1)
  image = 2 * np.eye(3)[label] - 1 + 0.5 * rng.normal(size=(4, 33, 33, 3))
  label[0, :4] = 255
  batch = {'image': jnp.asarray(image, jnp.float32),
           'label': jnp.asarray(label, jnp.int32)}
  curves = {}
  for dtype in ('float32', 'bfloat16'):
    model = flaxseg.create_model('deeplabv3_resnet18', num_classes=3,
                                 base_width=4, aspp_width=8, aspp_dropout=0.0,
                                 output_stride=16, dtype=dtype)
    state = flaxseg.create_train_state(model, optax.adam(3e-3),
                                       jax.random.key(0), (1, 33, 33, 3))
    step = jax.jit(lambda s, b: flaxseg.train_step(s, b, axis_name=None))
    losses = []
    for _ in range(25):
      state, m = step(state, batch)
      assert float(m['finite']) == 1.0
      losses.append(float(m['loss']))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    curves[dtype] = np.array(losses)
  c32, c16 = curves['float32'], curves['bfloat16']
  assert c32[-1] < 0.25 * c32[0] and c16[-1] < 0.25 * c16[0], (c32, c16)
  # Adam's first steps amplify any difference into a shifted transient (up
  # to 0.13 apart at step 3 here), so the run is compared on average and at
  # its end, both relative to the initial loss.
  gap = np.abs(c16 - c32) / c32[0]
  assert gap.mean() < 0.03 and gap[-1] < 0.03, gap


def test_eval_step_confusion_counts_valid_pixels(batch):
  state = _state('float32')
  out = flaxseg.eval_step(state, dict(batch, valid=jnp.array([True, False])),
                          axis_name=None, num_classes=3)
  assert out['prediction'].shape == (2, 33, 33)
  assert int(out['confusion'].sum()) == int(
      np.sum(np.asarray(batch['label'][0]) != 255))


def test_non_finite_loss_is_flagged(batch):
  state = _state('float32')
  bad = dict(batch, image=batch['image'].at[0, 0, 0, 0].set(jnp.nan))
  _, m = flaxseg.train_step(state, bad, axis_name=None)
  assert float(m['finite']) == 0.0


def test_non_finite_update_is_skipped_on_request(batch):
  state = _state('float32')
  bad = dict(batch, image=batch['image'].at[0, 0, 0, 0].set(jnp.nan))
  new, m = flaxseg.train_step(state, bad, axis_name=None, skip_nonfinite=True)
  assert float(m['finite']) == 0.0 and int(new.step) == int(state.step) + 1
  for a, b in zip(jax.tree.leaves((new.params, new.batch_stats, new.opt_state)),
                  jax.tree.leaves((state.params, state.batch_stats,
                                   state.opt_state))):
    np.testing.assert_array_equal(a, b)
  good, _ = flaxseg.train_step(state, batch, axis_name=None,
                               skip_nonfinite=True)
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(good.params), jax.tree.leaves(state.params)))
