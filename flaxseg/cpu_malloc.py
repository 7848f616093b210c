"""glibc malloc settings that keep XLA:CPU's step buffers mapped between steps.

On the CPU backend XLA allocates each execution's temporary buffers with
``malloc`` and frees them when the step ends. glibc serves allocations above
its mmap threshold with fresh ``mmap``s and unmaps them on ``free``, so every
training step page-faults its whole working set back in: for the
DeepLab v3-ResNet-50 step at batch 4, 321x321, about 940k page faults (3.7 GB)
and 2-3 s of kernel time per step on the 2-core development machine, more
when another library in the process (torchvision, in ``bench/``) maps and
unmaps its own memory alongside (BENCHMARKS.md). Telling glibc never to
``mmap`` (``mmap_max=0``), never to give the heap back (``trim_threshold``)
and to use one arena (``arena_max=1``, so that no thread's arena unmaps a
heap; small allocations still go through glibc's per-thread caches) makes
those faults 0 after the first step.

The settings are ``GLIBC_TUNABLES``, read by glibc when the process starts,
so the entry points (``train.py``, ``python -m flaxseg.predict``, the
``bench/`` scripts) call `reexec_if_needed` first thing: when JAX will run
on the CPU, glibc is the C library and the user has not set malloc
tunables, the process replaces itself (``os.execve``, same PID and command
line) with the settings added. ``FLAXSEG_CPU_MALLOC=0`` turns this off.
Libraries are never re-executed: importing flaxseg changes nothing.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys
from typing import Mapping, Optional

#: Never ``mmap`` (every block comes from the brk heap), never trim the heap,
#: one arena.
TUNABLES = ('glibc.malloc.mmap_max=0',
            'glibc.malloc.trim_threshold=68719476736',
            'glibc.malloc.arena_max=1')
#: Set to 0/off/false/no to keep glibc's defaults.
OPT_OUT = 'FLAXSEG_CPU_MALLOC'


def _glibc() -> bool:
  name, version = platform.libc_ver()
  if name != 'glibc' or not version:
    return False
  major, minor = (int(v) for v in version.split('.')[:2])
  return (major, minor) >= (2, 26)   # malloc tunables appeared in 2.26


def _accelerator_plugins() -> bool:
  """Whether a JAX accelerator backend (CUDA, ROCm, TPU) is installed."""
  if importlib.metadata.entry_points(group='jax_plugins'):
    return True
  if importlib.util.find_spec('libtpu') is not None:
    return True
  spec = importlib.util.find_spec('jax_plugins')
  if spec is not None and spec.submodule_search_locations:
    for path in spec.submodule_search_locations:
      if os.path.isdir(path) and any(not n.startswith(('_', '.'))
                                     for n in os.listdir(path)):
        return True
  return False


def runs_on_cpu(environ: Mapping[str, str]) -> bool:
  """Whether JAX in a process with `environ` will compute on the CPU."""
  platforms = environ.get('JAX_PLATFORMS', '').strip().lower()
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  return not _accelerator_plugins()


def tuned_environ(environ: Mapping[str, str]) -> Optional[dict]:
  """`environ` with `TUNABLES` added, or None when nothing should change.

  Nothing changes when the opt-out variable is set to 0/off/false/no, when
  `environ` already carries glibc malloc tunables (the user's, or ours),
  when the C library is not glibc >= 2.26, or when JAX will run on an
  accelerator (whose buffers live in device memory).

  Args:
    environ: the process environment (``os.environ``).

  Returns:
    A new environment dict, or None.
  """
  if environ.get(OPT_OUT, '').strip().lower() in ('0', 'off', 'false', 'no'):
    return None
  current = environ.get('GLIBC_TUNABLES', '')
  if 'glibc.malloc.' in current:   # the user's, or ours: a re-executed process
    return None
  if not sys.platform.startswith('linux') or not _glibc():
    return None
  if not runs_on_cpu(environ):
    return None
  new = dict(environ)
  new['GLIBC_TUNABLES'] = ':'.join(([current] if current else []) +
                                   list(TUNABLES))
  return new


def reexec_if_needed() -> None:
  """Restarts this process with `TUNABLES` when `tuned_environ` says so.

  Call it first thing in a command's entry point, before JAX starts
  threads. The process keeps its PID and command line (``sys.orig_argv``);
  only the environment differs. Returns normally when nothing is to change.
  """
  env = tuned_environ(os.environ)
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, list(sys.orig_argv), env)


def describe() -> str:
  """A line for benchmark reports: the malloc settings of this process."""
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  return f'GLIBC_TUNABLES={tunables}' if tunables else 'glibc malloc defaults'
