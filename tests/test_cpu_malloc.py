"""flaxseg.cpu_malloc: when commands re-execute with glibc malloc tunables,
and that it keeps a jitted function's buffers from page-faulting every call."""

import json
import os
import subprocess
import sys

import pytest

from flaxseg import cpu_malloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = cpu_malloc._glibc() and sys.platform.startswith('linux')


@pytest.mark.skipif(not GLIBC, reason='glibc only')
def test_tuned_environ_decisions():
  base = {'PATH': '/bin', 'JAX_PLATFORMS': 'cpu'}
  env = cpu_malloc.tuned_environ(base)
  assert env['GLIBC_TUNABLES'] == ':'.join(cpu_malloc.TUNABLES)
  assert env['PATH'] == '/bin' and 'GLIBC_TUNABLES' not in base
  # Other tunables are kept, ours appended.
  env = cpu_malloc.tuned_environ(dict(base, GLIBC_TUNABLES='glibc.rtld.x=1'))
  assert env['GLIBC_TUNABLES'].startswith('glibc.rtld.x=1:glibc.malloc.')
  # Nothing changes: the user's malloc tunables, ours (no loop), opt-out,
  # an accelerator platform.
  assert cpu_malloc.tuned_environ(
      dict(base, GLIBC_TUNABLES='glibc.malloc.arena_max=4')) is None
  assert cpu_malloc.tuned_environ(env) is None
  for off in ('0', 'off', 'False'):
    assert cpu_malloc.tuned_environ(
        dict(base, FLAXSEG_CPU_MALLOC=off)) is None
  assert cpu_malloc.tuned_environ(dict(base, JAX_PLATFORMS='cuda,cpu')) is None
  assert cpu_malloc.runs_on_cpu({'JAX_PLATFORMS': 'cpu'})
  assert not cpu_malloc.runs_on_cpu({'JAX_PLATFORMS': 'tpu'})


SCRIPT = r'''
import json, os, resource, sys
from flaxseg import cpu_malloc
pid = os.getpid()
cpu_malloc.reexec_if_needed()
import jax, jax.numpy as jnp
# About 200 MB of temporaries per call.
f = jax.jit(lambda x: jnp.sum(jnp.tanh(x @ x.T) @ x, axis=0))
x = jnp.ones((4096, 2048), jnp.float32)
for _ in range(3):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({'faults': faults, 'pid': pid, 'pid_after': os.getpid(),
                  'tunables': os.environ.get('GLIBC_TUNABLES', ''),
                  'describe': cpu_malloc.describe()}))
'''


def _script(**env):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT, **env)
  env.pop('GLIBC_TUNABLES', None)
  proc = subprocess.run([sys.executable, '-c', SCRIPT], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason='glibc only')
def test_reexec_keeps_the_pid_and_stops_the_page_faults():
  tuned = _script()
  default = _script(FLAXSEG_CPU_MALLOC='0')
  assert tuned['pid'] == tuned['pid_after']      # execve: same process
  assert tuned['tunables'] == ':'.join(cpu_malloc.TUNABLES)
  assert 'GLIBC_TUNABLES=glibc.malloc.mmap_max=0' in tuned['describe']
  assert default['tunables'] == '' and default['describe'] == (
      'glibc malloc defaults')
  # glibc's defaults map the buffers afresh on every call (about 530k faults
  # of 4 KiB on the development machine); the tunables reuse them (0).
  assert default['faults'] > 10000, default
  assert tuned['faults'] < default['faults'] / 10, (tuned, default)
