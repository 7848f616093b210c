"""Tests for flaxseg.losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseg import losses


def _reference(logits, labels, ignore=255):
  logits = np.asarray(logits, np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  valid = labels != ignore
  picked = np.take_along_axis(logp, np.where(valid, labels, 0)[..., None],
                              -1)[..., 0]
  return -(picked * valid).sum() / valid.sum()


def test_ignores_void_and_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7, 4)).astype(np.float32)
  labels = rng.integers(0, 4, size=(2, 5, 7))
  labels[0, :2] = 255
  got = losses.segmentation_loss(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(got, _reference(logits, labels), rtol=1e-5)
  # Changing the logits under void pixels changes nothing.
  logits2 = logits.copy()
  logits2[0, :2] = 100.0
  got2 = losses.segmentation_loss(jnp.asarray(logits2), jnp.asarray(labels))
  np.testing.assert_allclose(got2, got, rtol=1e-6)


def test_sharded_loss_sums_to_global_mean():
  """Per-shard values normalised by the psum'd count add up to the batch mean."""
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(4, 3, 3, 5)).astype(np.float32)
  labels = rng.integers(0, 5, size=(4, 3, 3))
  labels[1] = 255  # shards see different valid counts
  labels[2, 0] = 255
  shard = jax.vmap(
      lambda l, y: losses.segmentation_loss(l, y, axis_name='d'),
      axis_name='d')
  per_shard = shard(jnp.asarray(logits).reshape(4, 1, 3, 3, 5),
                    jnp.asarray(labels).reshape(4, 1, 3, 3))
  np.testing.assert_allclose(per_shard.sum(), _reference(logits, labels),
                             rtol=1e-5)


def test_unnormalised_is_sum():
  logits = jnp.zeros((1, 2, 2, 2))
  labels = jnp.array([[[0, 1], [255, 1]]])
  got = losses.segmentation_loss(logits, labels, normalize=False)
  np.testing.assert_allclose(got, 3 * np.log(2), rtol=1e-6)


def test_all_void_is_zero_not_nan():
  got = losses.segmentation_loss(jnp.ones((1, 2, 2, 3)),
                                 jnp.full((1, 2, 2), 255))
  assert float(got) == 0.0
