"""Killed runs: SIGKILL at random steps, and a kill in the middle of a save.

``train.py`` runs as a subprocess on the tiny config with a checkpoint every
step (asynchronous, so kills also land while a save is in flight). SIGTERM's
exit status 0 and zero lost steps are checked through ``bench/soak.py``
(``tests/bench/test_bench_perf.py``); SIGTERM in-process in ``test_loop``,
across two processes in ``test_multihost``.
"""

import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from flaxseg.checkpoint import Checkpoints

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_loop import (ROOT, final_tree, tiny_config,  # noqa: E402
                       tiny_data)

NUM_STEPS = 8


def _train(workdir, data_root):
  cmd = [sys.executable, os.path.join(ROOT, 'train.py'),
         '--config=' + os.path.join(ROOT, 'configs', 'deeplabv3.py') + ':tiny',
         f'--workdir={workdir}', f'--config.data.root={data_root}',
         f'--config.train.num_steps={NUM_STEPS}',
         '--config.train.log_every_steps=1', '--config.checkpoint.every_steps=1',
         '--config.checkpoint.max_to_keep=2']
  return subprocess.Popen(cmd, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                          cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _run_until(proc, marker):
  """Reads ``proc``'s output until a line starting with ``marker``."""
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith(marker):
      return ''.join(lines)
  proc.wait()
  raise AssertionError(f'no {marker!r} line; rc={proc.returncode}:\n'
                       + ''.join(lines)[-3000:])


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
  return tiny_data(tmp_path_factory, 'kill_data')


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, data_root):
  workdir = str(tmp_path_factory.mktemp('whole'))
  proc = _train(workdir, data_root)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  config = tiny_config()
  config.train.num_steps = NUM_STEPS
  return final_tree(workdir, config)


@pytest.mark.parametrize('seed', [0, 1])
def test_sigkill_at_random_steps_then_resume_is_exact(seed, data_root,
                                                      uninterrupted, tmp_path):
  rng = np.random.default_rng(seed)
  workdir = str(tmp_path / 'killed')
  # Two kills per run, each just after a random step was logged (its
  # checkpoint's asynchronous write may be in flight), then a clean finish.
  kill_after = sorted(rng.choice(np.arange(1, NUM_STEPS), 2, replace=False))
  for k in kill_after:
    proc = _train(workdir, data_root)
    _run_until(proc, f'step {k}/{NUM_STEPS}')
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
  proc = _train(workdir, data_root)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  assert 'resumed from' in out
  config = tiny_config()
  config.train.num_steps = NUM_STEPS
  final = final_tree(workdir, config)
  assert int(final['step']) == NUM_STEPS
  jax.tree.map(np.testing.assert_array_equal, final, uninterrupted)


KILL_IN_SAVE = r'''
import os, signal, sys
import numpy as np
from flaxseg.checkpoint import Checkpoints
ckpts = Checkpoints(sys.argv[1], async_save=True)
rng = np.random.default_rng(0)
tree = {'w': rng.standard_normal((64, 1024, 1024), np.float32)}   # 256 MB
ckpts.save(1, tree, {'step': 1})
ckpts.wait()
tree['w'] += 1.0
ckpts.save(2, tree, {'step': 2})      # returns while the write is in flight
os.kill(os.getpid(), signal.SIGKILL)
'''


def test_kill_during_async_save_leaves_previous_checkpoint(tmp_path):
  directory = str(tmp_path / 'checkpoints')
  proc = subprocess.run([sys.executable, '-c', KILL_IN_SAVE, directory],
                        env=dict(os.environ, JAX_PLATFORMS='cpu'), cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  # The interrupted step-2 write left something behind but no step 2.
  assert set(os.listdir(directory)) != {'1'}, os.listdir(directory)
  ckpts = Checkpoints(directory)
  assert ckpts.latest_step() == 1
  target = {'w': np.zeros((64, 1024, 1024), np.float32)}
  tree, meta = ckpts.restore(target, {}, check_keys=())
  expect = np.random.default_rng(0).standard_normal((64, 1024, 1024),
                                                    np.float32)
  np.testing.assert_array_equal(np.asarray(tree['w']), expect)
  assert meta['step'] == 1
  # Saving goes on from there.
  tree = {'w': np.asarray(tree['w']) + 2.0}
  ckpts.save(2, tree, {'step': 2})
  ckpts.wait()
  assert ckpts.latest_step() == 2
  ckpts.close()
