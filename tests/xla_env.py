"""XLA_FLAGS for the tests and the subprocesses they start.

``conftest.py`` compiles the suite without LLVM's optimisation passes
(`FAST_COMPILE`); tests that start JAX in a subprocess with several host CPU
devices build its environment with `cpu_devices`.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

#: LLVM codegen without its optimisation passes (XLA's HLO passes, fusion
#: included, still run): faster compiles, slower loops.
FAST_COMPILE = '--xla_backend_optimization_level=0'


def _flags(flags: str, add=(), drop=()) -> str:
  kept = [f for f in flags.split()
          if not any(f.split('=')[0] == d.split('=')[0] for d in drop)]
  return ' '.join(kept + list(add))


def with_fast_compile(env: Mapping[str, str]) -> Optional[str]:
  """``env``'s XLA_FLAGS plus `FAST_COMPILE`, or None if it sets a level."""
  flags = env.get('XLA_FLAGS', '')
  if FAST_COMPILE.split('=')[0] in flags:
    return None
  return _flags(flags, add=[FAST_COMPILE])


def cpu_devices(n: int, optimized: bool = False,
                base: Optional[Mapping[str, str]] = None) -> dict[str, str]:
  """A subprocess environment: JAX on the CPU with ``n`` host devices.

  The flags already in ``base`` (default ``os.environ``: the suite's
  settings) are kept; ``optimized=True`` takes `FAST_COMPILE` out again, for
  runs that are mostly run time rather than compile time.
  """
  env = dict(os.environ if base is None else base)
  drop = ['--xla_force_host_platform_device_count']
  if optimized:
    drop.append(FAST_COMPILE)
  env['XLA_FLAGS'] = _flags(
      env.get('XLA_FLAGS', ''), drop=drop,
      add=[f'--xla_force_host_platform_device_count={n}'])
  env['JAX_PLATFORMS'] = 'cpu'
  return env
