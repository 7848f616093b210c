"""CRF-RNN trains through train.py on 8 simulated devices, batch 4 each."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests import xla_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
STEPS = 8


def _train(workdir, parallel, *extra):
  # Optimised code, as users run it (conftest.py compiles the suite without
  # LLVM's passes): 8 training steps of the permutohedral lattice on 8
  # devices are mostly run time, which unoptimised loops make 3-4x longer.
  env = xla_env.cpu_devices(8, optimized=True)
  cmd = [sys.executable, os.path.join(ROOT, 'train.py'),
         '--config=' + os.path.join(ROOT, 'configs', 'crfasrnn.py:tiny'),
         f'--workdir={workdir}', f'--config.parallel={parallel}',
         '--config.data.batch_size=32', '--config.data.eval_batch_size=8',
         f'--config.train.num_steps={STEPS}',
         '--config.train.log_every_steps=1',
         '--config.checkpoint.every_steps=100',
         '--config.checkpoint.async_save=False', *extra]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                        timeout=900, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout + proc.stderr


@pytest.mark.parametrize('parallel', ['pmap', 'shard_map'])
def test_crfasrnn_trains_on_8_devices_with_batch_4_each(tmp_path, parallel):
  out = _train(str(tmp_path / 'run'), parallel)
  assert 'on 8 device(s)' in out and 'global batch 32' in out, out[-2000:]
  losses = [float(x) for x in re.findall(r'step \d+/\d+\s+loss ([0-9.]+)', out)]
  assert len(losses) == STEPS, out[-2000:]
  assert np.all(np.isfinite(losses))
  # Different batches every step: compare the first and last pairs.
  assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
  assert os.path.exists(tmp_path / 'run' / f'eval_{STEPS}.json')


def _recipe(variant):
  sys.path.insert(0, os.path.join(ROOT, 'configs'))
  try:
    import crfasrnn  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  config = crfasrnn.get_config(variant)
  config.train.num_steps = 2
  config.eval.num_visualize = 0
  config.checkpoint.async_save = False
  return config


def test_two_stage_recipe_starts_stage_2_from_stage_1(tmp_path, capsys):
  """Stage 1 (FCN-8s) trains; stage 2 (CRF-RNN) starts from its weights:
  every FCN-8s array is stage 1's, the CRF's are at their Potts init.
  (Stage 2's training itself is the 8-device test above.)"""
  import jax
  from flaxseg.checkpoint import CheckpointError, load_variables
  from flaxseg.train import loop, warm_start
  stage1_dir = str(tmp_path / 'fcn8s')
  loop.train_and_evaluate(_recipe('tiny_stage1'), stage1_dir)
  stage1, _ = load_variables(stage1_dir)

  config = _recipe('tiny')
  config.model.init_from = stage1_dir
  fresh = loop.initial_state(config, loop.build_model(config))
  state = warm_start.init_from_checkpoint(config, fresh)
  crf = state.params.pop('crf')
  jax.tree.map(np.testing.assert_array_equal, dict(state.params),
               stage1['params'])
  jax.tree.map(np.testing.assert_array_equal, crf, fresh.params['crf'])
  np.testing.assert_array_equal(crf['compatibility'], -np.eye(7))
  assert 'keep their initial values: params/crf/' in capsys.readouterr().out

  # A resumed run ignores init_from: it is not part of the run's metadata.
  assert 'init_from' not in loop.run_meta(config)['model']

  # The trainer calls it: a source that does not fit names the arrays, before
  # anything is written.
  wrong = _recipe('tiny')
  wrong.model.width_multiplier *= 2
  wrong.model.init_from = stage1_dir
  with pytest.raises(CheckpointError, match='score_fr/kernel: checkpoint shape'):
    loop.train_and_evaluate(wrong, str(tmp_path / 'wrong'))
  assert not os.path.exists(tmp_path / 'wrong' / 'checkpoints' / '0')
