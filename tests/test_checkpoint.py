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


def _run_checkpoint(workdir):
  c = Checkpoints(os.path.join(workdir, 'checkpoints'), async_save=False)
  c.save(3, {'step': jnp.asarray(3, jnp.int32),
             'params': {'score': {'kernel': jnp.full((2, 3), 2.0)},
                        'backbone': {'bias': jnp.ones((3,))}},
             'batch_stats': {}}, dict(META, step=3))
  c.close()


def test_init_from_loads_matching_arrays_and_keeps_the_rest(tmp_path):
  from flaxseg.checkpoint import load_variables, merge_variables
  _run_checkpoint(str(tmp_path / 'run'))
  target = {'params': {'score': {'kernel': jnp.zeros((2, 3))},
                       'backbone': {'bias': jnp.zeros((3,))},
                       'crf': {'compatibility': -jnp.eye(3)}},
            'batch_stats': {}}
  for path in (tmp_path / 'run', tmp_path / 'run' / 'checkpoints',
               tmp_path / 'run' / 'checkpoints' / '3'):
    source, meta = load_variables(str(path))
    assert meta['step'] == 3 and meta['source'].endswith('3')
    merged, report = merge_variables(target, source, str(path))
    np.testing.assert_array_equal(merged['params']['score']['kernel'], 2.0)
    np.testing.assert_array_equal(merged['params']['crf']['compatibility'],
                                  -np.eye(3))
    assert report['kept'] == ['params/crf/compatibility']
    assert len(report['loaded']) == 2


def test_init_from_errors_name_the_path_and_the_arrays(tmp_path):
  from flaxseg.checkpoint import load_variables, merge_variables
  missing = tmp_path / 'nowhere'
  with pytest.raises(CheckpointError, match='nowhere'):
    load_variables(str(missing))
  assert not missing.exists()
  (tmp_path / 'empty').mkdir()
  with pytest.raises(CheckpointError, match='no checkpoint'):
    load_variables(str(tmp_path / 'empty'))
  _run_checkpoint(str(tmp_path / 'run'))
  source, _ = load_variables(str(tmp_path / 'run'))
  wrong = {'params': {'score': {'kernel': jnp.zeros((2, 4))}},
           'batch_stats': {}}
  with pytest.raises(CheckpointError) as e:
    merge_variables(wrong, source, 'RUN')
  assert 'params/score/kernel: checkpoint shape (2, 3), model shape (2, 4)' in (
      str(e.value))
  assert 'params/backbone/bias: in the checkpoint, not in the model' in str(
      e.value)
  with pytest.raises(CheckpointError, match='no array'):
    merge_variables({'params': {'other': {'w': jnp.zeros(1)}},
                     'batch_stats': {}}, {'params': {}, 'batch_stats': {}},
                    'RUN')
