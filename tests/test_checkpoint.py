"""Tests for flaxseg.checkpoint: round trip, mismatch errors, no data loss."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from flaxseg.checkpoint import CheckpointError, Checkpoints

META = {'model': {'name': 'm', 'width': 4}, 'num_classes': 3}


def _tree(scale=1.0, width=4):
  return {'step': jnp.asarray(7, jnp.int32),
          'params': {'w': jnp.arange(width, dtype=jnp.float32) * scale}}


def _listing(path):
  return sorted((os.path.relpath(os.path.join(d, f), path),
                 os.path.getsize(os.path.join(d, f)))
                for d, _, fs in os.walk(path) for f in fs)


def test_round_trip_and_keep_n(tmp_path):
  c = Checkpoints(str(tmp_path), max_to_keep=2, async_save=True)
  for step in (1, 2, 3):
    c.save(step, _tree(step), dict(META, step=step))
  c.wait()
  assert c.all_steps() == [2, 3]
  tree, meta = c.restore(_tree(0), META)
  np.testing.assert_array_equal(tree['params']['w'], np.arange(4) * 3.0)
  assert meta['step'] == 3
  c.close()


def test_other_model_is_refused_and_files_kept(tmp_path):
  c = Checkpoints(str(tmp_path))
  c.save(5, _tree(), META)
  c.wait()
  before = _listing(str(tmp_path))
  other = {'model': {'name': 'm', 'width': 8}, 'num_classes': 3}
  with pytest.raises(CheckpointError, match=r'model\.width: checkpoint has 4'):
    c.restore(_tree(width=8), other)
  assert _listing(str(tmp_path)) == before
  c.close()


def test_shape_mismatch_names_checkpoint(tmp_path):
  c = Checkpoints(str(tmp_path))
  c.save(5, _tree(), META)
  c.wait()
  with pytest.raises(CheckpointError, match=str(tmp_path)):
    c.restore(_tree(width=6), META)
  c.close()


def test_empty_directory(tmp_path):
  c = Checkpoints(str(tmp_path / 'none'))
  assert c.latest_step() is None
  with pytest.raises(CheckpointError, match='no checkpoint'):
    c.restore(_tree(), META)
