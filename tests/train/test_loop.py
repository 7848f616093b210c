"""End-to-end tests of the trainer on the tiny DeepLab v3 config.

Covers: a whole run (train, checkpoint, eval, pictures, JSON), exact resume
after an interruption, SIGTERM (checkpoint at the current step, return, exact
resume), refusal of a checkpoint from another model (with the
checkpoint left intact), the eval-only entry point, and train.py's handling of
an unknown config key.
"""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from flaxseg.checkpoint import CheckpointError, Checkpoints
from flaxseg.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))


def tiny_config():
  sys.path.insert(0, os.path.join(ROOT, 'configs'))
  try:
    import deeplabv3  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  return deeplabv3.get_config('tiny')


def final_tree(workdir, config):
  """The arrays of the newest checkpoint of ``workdir``."""
  state = loop.initial_state(config, loop.build_model(config))
  ckpts = Checkpoints(os.path.join(workdir, 'checkpoints'))
  tree, _ = ckpts.restore(state.checkpoint_tree(), loop.run_meta(config),
                          check_keys=())
  return jax.device_get(tree)


def _listing(path):
  return sorted((os.path.relpath(os.path.join(d, f), path),
                 os.path.getsize(os.path.join(d, f)))
                for d, _, fs in os.walk(path) for f in fs)


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
  """One synthetic tree shared by the runs (generation is not under test)."""
  root = str(tmp_path_factory.mktemp('tiny_data') / 'voc')
  c = tiny_config()
  return loop.ensure_synthetic(root, c.data.synthetic.to_dict(), c.seed)


@pytest.fixture(scope='module')
def full_run(tmp_path_factory, data_root):
  """An uninterrupted tiny run: (config, workdir, result)."""
  config = tiny_config()
  config.data.root = os.path.dirname(os.path.dirname(data_root))
  workdir = str(tmp_path_factory.mktemp('full'))
  result = loop.train_and_evaluate(config, workdir)
  return config, workdir, result


def test_run_writes_checkpoints_eval_and_pictures(full_run):
  config, workdir, result = full_run
  assert result['step'] == config.train.num_steps
  assert np.isfinite(result['train_loss'])
  ckpts = Checkpoints(os.path.join(workdir, 'checkpoints'))
  assert ckpts.latest_step() == config.train.num_steps
  with open(os.path.join(workdir, f'eval_{config.train.num_steps}.json')) as f:
    report = json.load(f)
  assert 0.0 <= report['miou'] <= 1.0
  assert len(report['per_class']) == config.data.num_classes
  pics = os.listdir(os.path.join(workdir, 'predictions',
                                 f'step_{config.train.num_steps}'))
  assert len(pics) == config.eval.num_visualize
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))


def test_interrupted_run_resumes_exactly(full_run, tmp_path, monkeypatch):
  config, full_dir, _ = full_run
  workdir = str(tmp_path / 'interrupted')
  original_save = Checkpoints.save

  def save_then_die(self, step, tree, meta, force=True):
    original_save(self, step, tree, meta, force)
    if step == 2:
      self.wait()
      raise KeyboardInterrupt('simulated preemption after step 2')
  monkeypatch.setattr(Checkpoints, 'save', save_then_die)
  with pytest.raises(KeyboardInterrupt):
    loop.train_and_evaluate(config, workdir)
  monkeypatch.setattr(Checkpoints, 'save', original_save)
  assert Checkpoints(os.path.join(workdir, 'checkpoints')).latest_step() == 2
  loop.train_and_evaluate(config, workdir)
  resumed, full = final_tree(workdir, config), final_tree(full_dir, config)
  assert int(resumed['step']) == int(full['step']) == config.train.num_steps
  jax.tree.map(np.testing.assert_array_equal, resumed, full)


def test_sigterm_checkpoints_returns_and_resumes_exactly(full_run, tmp_path,
                                                        monkeypatch):
  config, full_dir, _ = full_run
  workdir = str(tmp_path / 'preempted')
  original = loop._map_train_step
  before = signal.getsignal(signal.SIGTERM)

  def signalled_at_step_3(config, dp):
    p_train, calls = original(config, dp), []

    def step(*args):
      calls.append(1)
      if len(calls) == 3:     # the VM is being preempted during step 3
        os.kill(os.getpid(), signal.SIGTERM)
      return p_train(*args)
    return step

  monkeypatch.setattr(loop, '_map_train_step', signalled_at_step_3)
  result = loop.train_and_evaluate(config, workdir)
  assert result['preempted'] == 'SIGTERM' and result['step'] == 3
  assert result['scores'] is None
  assert Checkpoints(os.path.join(workdir, 'checkpoints')).latest_step() == 3
  assert signal.getsignal(signal.SIGTERM) == before   # handlers restored
  monkeypatch.setattr(loop, '_map_train_step', original)
  result = loop.train_and_evaluate(config, workdir)
  assert result['preempted'] is None and result['scores'] is not None
  resumed, full = final_tree(workdir, config), final_tree(full_dir, config)
  assert int(resumed['step']) == int(full['step']) == config.train.num_steps
  jax.tree.map(np.testing.assert_array_equal, resumed, full)


def test_checkpoint_of_other_model_is_refused(full_run, tmp_path):
  config, full_dir, _ = full_run
  before = _listing(os.path.join(full_dir, 'checkpoints'))
  other = tiny_config()
  other.data.root = config.data.root
  other.model.base_width = 16
  with pytest.raises(CheckpointError, match='model.base_width'):
    loop.train_and_evaluate(other, full_dir)
  assert _listing(os.path.join(full_dir, 'checkpoints')) == before


def test_evaluate_checkpoint_matches_training_eval(full_run):
  config, workdir, result = full_run
  scores = loop.evaluate_checkpoint(config, workdir)
  np.testing.assert_array_equal(scores['confusion'],
                                result['scores']['confusion'])


def test_train_py_names_unknown_key(tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'train.py'),
       '--config=' + os.path.join(ROOT, 'configs', 'deeplabv3.py') + ':tiny',
       '--workdir=' + str(tmp_path), '--config.optim.lrr=0.1'],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert proc.returncode != 0
  assert 'lrr' in proc.stderr
  assert not os.listdir(tmp_path)


def test_missing_dataset_root_is_named(tmp_path):
  config = tiny_config()
  config.data.dataset = 'voc'
  config.data.root = str(tmp_path / 'no_such_voc')
  with pytest.raises(ValueError, match='no_such_voc'):
    loop.train_and_evaluate(config, str(tmp_path / 'run'))
