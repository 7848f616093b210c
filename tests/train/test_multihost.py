"""Multi-host training on JAX's distributed runtime, as 2 local processes.

Two ``train.py`` processes with 2 CPU devices each (Gloo collectives,
coordinator on 127.0.0.1) must end with exactly the parameters of one
process with 4 devices, also when the 2-process run is preempted by a
SIGTERM to one of its processes and started again. ``config.train.reduction=
'ordered'`` makes the cross-device sums independent of the collective's
summation order (see ``flaxseg.collectives``); the default ``psum`` agrees
only to rounding.
"""

import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_loop import (ROOT, final_tree, tiny_config,  # noqa: E402
                       tiny_data)

NUM_STEPS = 6


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch(workdir, data_root, devices, mode, process=None, port=None):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=(os.environ.get('XLA_FLAGS', '') +
                        f' --xla_force_host_platform_device_count={devices}'
                        ).strip())
  cmd = [sys.executable, os.path.join(ROOT, 'train.py'),
         '--config=' + os.path.join(ROOT, 'configs', 'deeplabv3.py') + ':tiny',
         f'--workdir={workdir}', f'--config.data.root={data_root}',
         f'--config.parallel={mode}', '--config.train.reduction=ordered',
         f'--config.train.num_steps={NUM_STEPS}',
         '--config.checkpoint.every_steps=100']
  if process is not None:
    cmd += [f'--config.distributed.coordinator_address=127.0.0.1:{port}',
            '--config.distributed.num_processes=2',
            f'--config.distributed.process_id={process}']
  return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _two_processes(workdir, data_root, mode):
  port = _free_port()
  return [_launch(workdir, data_root, 2, mode, i, port) for i in (0, 1)]


def _finish(proc, timeout=600):
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-3000:]
  return out


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
  return tiny_data(tmp_path_factory, 'mh_data')


def _preempt_process_1(procs):
  """SIGTERM to process 1 once process 0 starts training; their outputs."""
  # Process 0 prints 'training ...' once the runtime is up and the state is
  # initialised. JAX's preemption sync then makes both processes checkpoint
  # the same step and return.
  first_lines = []
  for line in procs[0].stdout:
    first_lines.append(line)
    if line.startswith('training '):
      procs[1].send_signal(signal.SIGTERM)
      break
  return [''.join(first_lines) + _finish(procs[0]), _finish(procs[1])]


# pmap with a preemption and restart; shard_map straight through (each case
# costs about a minute of 2 cores).
@pytest.mark.parametrize('mode,preempt', [('pmap', True),
                                          ('shard_map', False)])
def test_two_processes_equal_one_process(mode, preempt, data_root, tmp_path):
  config = tiny_config()
  config.train.num_steps = NUM_STEPS
  single_dir, multi_dir = str(tmp_path / 'single'), str(tmp_path / 'multi')
  single = _launch(single_dir, data_root, 4, mode)
  procs = _two_processes(multi_dir, data_root, mode)
  if preempt:
    out = _preempt_process_1(procs)[0]
    assert 'on 4 device(s)' in out, out[-2000:]
    assert 'SIGTERM at step' in out, out[-2000:]
    stopped = int(out.split('SIGTERM at step ')[1].split(':')[0])
    assert 1 <= stopped < NUM_STEPS
    # Started again, the run resumes on both processes and completes.
    procs = _two_processes(multi_dir, data_root, mode)
    out = _finish(procs[0])
    assert f'at step {stopped}' in out and 'resumed from' in out, out[-2000:]
  else:
    out = _finish(procs[0])
    assert 'on 4 device(s)' in out, out[-2000:]
  _finish(procs[1])
  _finish(single)
  multi, one = final_tree(multi_dir, config), final_tree(single_dir, config)
  assert int(multi['step']) == int(one['step']) == NUM_STEPS
  jax.tree.map(np.testing.assert_array_equal, multi, one)
