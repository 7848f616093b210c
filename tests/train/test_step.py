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
  """bf16 compute: same loss (2%: bf16 keeps 8 bits) and gradient direction."""
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
  np.testing.assert_allclose(l16, l32, rtol=2e-2)
  cosine = float(g16 @ g32 / (jnp.linalg.norm(g16) * jnp.linalg.norm(g32)))
  assert cosine > 0.95, cosine  # measured 0.966 for this tiny random net
  # And a bf16 train step keeps float32 parameters.
  state, m = jax.jit(lambda s, b: flaxseg.train_step(s, b, axis_name=None))(
      _state('bfloat16'), batch)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
  assert float(m['finite']) == 1.0


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
