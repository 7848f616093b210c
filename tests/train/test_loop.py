"""End-to-end tests of the trainer on the tiny DeepLab v3 config.

Covers: a whole run (train, checkpoint, eval, pictures, JSON), exact resume
after an interruption, SIGTERM (checkpoint at the current step, return, exact
resume), refusal of a checkpoint from another model (with the
checkpoint left intact), the eval-only entry point, and train.py's handling of
an unknown config key.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

from flaxseg.checkpoint import CheckpointError, Checkpoints
from flaxseg.data import voc
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


def tiny_data(tmp_path_factory, name):
  """Generates the tiny config's synthetic tree; returns its root (what
  ``--config.data.root`` takes), for runs of ``train.py`` in subprocesses."""
  root = str(tmp_path_factory.mktemp(name) / 'voc')
  c = tiny_config()
  loop.ensure_synthetic(root, c.data.synthetic.to_dict(), c.seed)
  return root


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


def _nan_at_step(monkeypatch, bad_step):
  """Makes the training batch of ``bad_step`` all NaN."""
  original = loop._train_stream

  def stream(config, records, start_step, *args):
    for step, batch in enumerate(original(config, records, start_step, *args),
                                 start_step + 1):
      if step == bad_step:
        batch = dict(batch, image=np.full_like(batch['image'], np.nan))
      yield batch
  monkeypatch.setattr(loop, '_train_stream', stream)


def test_nan_stops_naming_the_step_and_keeps_the_good_checkpoint(
    full_run, tmp_path, monkeypatch):
  config, full_dir, _ = full_run
  workdir = str(tmp_path / 'nan')
  _nan_at_step(monkeypatch, config.train.num_steps)   # the last step
  with pytest.raises(FloatingPointError,
                     match=f'at step {config.train.num_steps} '):
    loop.train_and_evaluate(config, workdir)
  ckpts = Checkpoints(os.path.join(workdir, 'checkpoints'))
  assert ckpts.all_steps() == [2]          # no checkpoint of the bad step
  state = loop.initial_state(config, loop.build_model(config))
  good, _ = ckpts.restore(state.checkpoint_tree(), loop.run_meta(config))
  full, _ = Checkpoints(os.path.join(full_dir, 'checkpoints')).restore(
      state.checkpoint_tree(), loop.run_meta(config), step=2)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(good),
               jax.device_get(full))


def test_nan_update_skipped_by_config(full_run, tmp_path, monkeypatch, capsys):
  config, _, _ = full_run
  config = config.copy_and_resolve_references()
  config.train.on_nonfinite = 'skip'
  config.checkpoint.every_steps = 1
  config.checkpoint.max_to_keep = 10
  workdir = str(tmp_path / 'skip')
  _nan_at_step(monkeypatch, 3)
  result = loop.train_and_evaluate(config, workdir)
  assert result['step'] == config.train.num_steps
  assert result['skipped_steps'] == [3]
  assert 'skipped non-finite update(s) at step(s) 3; 1 so far' in (
      capsys.readouterr().out)
  ckpts = Checkpoints(os.path.join(workdir, 'checkpoints'))
  state = loop.initial_state(config, loop.build_model(config))
  trees = {s: jax.device_get(ckpts.restore(state.checkpoint_tree(),
                                           loop.run_meta(config), step=s)[0])
           for s in (2, 3, 4)}
  assert int(trees[3]['step']) == 3
  for key in ('params', 'batch_stats', 'opt_state'):   # step 3 changed nothing
    jax.tree.map(np.testing.assert_array_equal, trees[3][key], trees[2][key])
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(trees[4]))
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(trees[4]['params']), jax.tree.leaves(trees[3]['params'])))


def test_skip_limit_and_bad_mode():
  c = tiny_config()
  c.train.on_nonfinite = 'skip'
  c.train.max_nonfinite_skips = 1
  skips = loop._Skips(c.train)
  bad = {'loss': np.nan, 'main_loss': np.nan, 'aux_loss': 0.0,
         'grad_norm': np.nan, 'finite': 0.0}
  good = dict(bad, loss=1.0, main_loss=1.0, grad_norm=1.0, finite=1.0)
  assert skips.check([good, bad], 2)['loss'] == 1.0
  assert skips.check([good, bad], 2)['skipped_updates'] == 1.0  # seen once
  with pytest.raises(FloatingPointError, match='max_nonfinite_skips=1'):
    skips.check([bad], 3)
  c.train.on_nonfinite = 'ignore'
  with pytest.raises(ValueError, match='config.train.on_nonfinite'):
    loop.train_and_evaluate(c, '/nonexistent/never/written')


def _corrupted_copy(data_root, tmp_path):
  """A copy of the tiny tree with the first train and val image truncated."""
  root = os.path.dirname(os.path.dirname(data_root))
  copy = str(tmp_path / 'corrupt')
  shutil.copytree(root, copy)
  voc_root = os.path.join(copy, 'VOCdevkit', 'VOC2012')
  broken = {}
  for split in ('train', 'val'):
    record = voc.list_records(voc_root, split)[0]
    with open(record.image_path, 'r+b') as f:
      f.truncate(64)
    broken[split] = record
  return copy, broken


def test_corrupt_image_stops_naming_it_or_is_skipped(full_run, data_root,
                                                     tmp_path, capsys):
  config, _, _ = full_run
  config = config.copy_and_resolve_references()
  config.data.root, broken = _corrupted_copy(data_root, tmp_path)
  with pytest.raises(Exception, match=re.escape(broken['train'].image_path)):
    loop.train_and_evaluate(config, str(tmp_path / 'raise'))
  config.data.on_bad_example = 'skip'
  workdir = str(tmp_path / 'skip')
  result = loop.train_and_evaluate(config, workdir)
  assert result['step'] == config.train.num_steps
  assert result['skipped_examples'] == [broken['train'].id]
  assert result['scores']['skipped_examples'] == [broken['val'].id]
  out = capsys.readouterr().out
  assert f"skipped a training example: cannot decode image " \
      f"{broken['train'].image_path!r}" in out
  assert f"eval left out an example: cannot decode image " \
      f"{broken['val'].image_path!r}" in out
  with open(os.path.join(workdir, f'eval_{config.train.num_steps}.json')) as f:
    assert json.load(f)['skipped_examples'] == [broken['val'].id]


def test_checkpoint_of_other_model_is_refused(full_run, tmp_path):
  config, full_dir, _ = full_run
  before = _listing(os.path.join(full_dir, 'checkpoints'))
  other = tiny_config()
  other.data.root = config.data.root
  other.model.base_width = 16
  with pytest.raises(CheckpointError, match='model.base_width'):
    loop.train_and_evaluate(other, full_dir)
  assert _listing(os.path.join(full_dir, 'checkpoints')) == before


def test_compute_only_keys_restore_and_compute_the_same(full_run):
  """A checkpoint written without ``scan_blocks``/``remat`` is evaluated
  with them (they are `builders.COMPUTE_ONLY_KEYS`), and the scanned,
  rematerialised model predicts what the plain one did."""
  config, workdir, result = full_run
  other = tiny_config()
  other.data.root = config.data.root
  other.model.scan_blocks = True
  other.model.remat = True
  with warnings.catch_warnings():
    # Evaluation applies with train=False: no CPU scan warning.
    warnings.filterwarnings('error', message='ResNet scan_blocks')
    confusion = np.asarray(
        loop.evaluate_checkpoint(other, workdir)['confusion'])
  expected = np.asarray(result['scores']['confusion'])
  assert confusion.sum() == expected.sum()
  # Same function; XLA may order the sums of the scanned blocks differently,
  # so allow an argmax tie to flip on a few pixels in a thousand at most.
  assert np.abs(confusion - expected).sum() / 2 <= 1e-3 * expected.sum()


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
