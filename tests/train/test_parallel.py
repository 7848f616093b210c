"""pmap and jit(shard_map) agree with each other and with one device."""

import json
import os
import subprocess
import sys

import numpy as np

from tests import xla_env

HERE = os.path.dirname(os.path.abspath(__file__))


def test_pmap_shard_map_and_single_device_agree():
  env = xla_env.cpu_devices(8)
  proc = subprocess.run(
      [sys.executable, os.path.join(HERE, 'parallel_script.py')], env=env,
      capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  ref = np.array(out['ref_losses'])
  assert ref[-1] < ref[0]  # it does train
  for mode in ('pmap', 'shard_map'):
    np.testing.assert_allclose(out[mode]['losses'], ref, rtol=1e-5,
                               err_msg=mode)
    assert out[mode]['max_param_diff'] <= 1e-5 * max(
        1.0, out[mode]['max_param']), (mode, out[mode])
