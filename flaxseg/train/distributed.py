"""Multi-host start-up on JAX's own distributed runtime.

``initialize(config.distributed)`` runs before anything touches a JAX backend
(``train.py`` and ``loop.train_and_evaluate`` call it first). It calls
``jax.distributed.initialize`` when

* ``coordinator_address`` is set in the config (or ``JAX_COORDINATOR_ADDRESS``
  in the environment): with ``num_processes`` / ``process_id`` from the config
  where given, else from JAX's cluster detection;
* ``mode='auto'`` (default) and JAX's cluster detection recognises the
  machine (Cloud TPU pod slices, SLURM, Open MPI, Kubernetes with the
  ``kubernetes`` package): no arguments are needed there;
* ``mode='on'``: always (JAX's detection must then find every value).

``mode='off'`` never initialises. Without a cluster, ``'auto'`` leaves JAX
single-process. On CPU the cross-process collectives are Gloo
(``cpu_collectives``), which is what lets two processes on one machine run
the multi-host path in the tests.

After initialisation each process sees the global device list; the trainer
feeds every process its own shard of the data stream (``pipeline``'s
``process_index``/``process_count``), the train step's ``psum`` runs over all
devices of all processes, and every process takes part in each Orbax save.
"""

from __future__ import annotations

import os
from typing import Any, Dict

import jax

MODES = ('auto', 'on', 'off')


def _jax_initialized() -> bool:
  return bool(jax.distributed.is_initialized())


def _local_device_ids(value: str):
  value = str(value).strip()
  if not value:
    return None
  try:
    return [int(v) for v in value.split(',')]
  except ValueError as e:
    raise ValueError(f'config.distributed.local_device_ids={value!r}: expected '
                     "comma-separated integers such as '0,1'") from e


def initialize(dist) -> Dict[str, Any]:
  """Initialises JAX's distributed runtime as ``dist`` (config section) says.

  Args:
    dist: ``config.distributed`` (``mode``, ``coordinator_address``,
      ``num_processes``, ``process_id``, ``local_device_ids``,
      ``cpu_collectives``, ``initialization_timeout``).

  Returns:
    ``{'initialized': bool, 'process_index', 'process_count'}`` (the last two
    only once JAX is initialised; reading them starts the backends).

  Raises:
    ValueError: naming the key, for a bad mode or inconsistent values.
    RuntimeError: when a multi-process start is asked for after JAX has
      already run computations in this process.
  """
  mode = str(dist.mode)
  if mode not in MODES:
    raise ValueError(f'config.distributed.mode={mode!r}: expected one of '
                     f'{MODES}')
  if _jax_initialized():
    return {'initialized': True, 'process_index': jax.process_index(),
            'process_count': jax.process_count()}
  if mode == 'off':
    return {'initialized': False}
  address = str(dist.coordinator_address) or os.environ.get(
      'JAX_COORDINATOR_ADDRESS', '')
  num = int(dist.num_processes)
  pid = int(dist.process_id)
  if num < 0:
    raise ValueError(f'config.distributed.num_processes={num}: expected >= 1, '
                     'or 0 to take it from the cluster')
  if pid >= 0 and num and pid >= num:
    raise ValueError(f'config.distributed.process_id={pid} is not below '
                     f'num_processes={num}')
  kwargs = dict(
      coordinator_address=address or None,
      num_processes=num or None,
      process_id=pid if pid >= 0 else None,
      local_device_ids=_local_device_ids(dist.local_device_ids),
      initialization_timeout=int(dist.initialization_timeout))
  explicit = bool(address) or mode == 'on'
  previous = jax.config.jax_cpu_collectives_implementation
  if dist.cpu_collectives:
    # Only the CPU backend reads it; it must be set before backends start.
    jax.config.update('jax_cpu_collectives_implementation',
                      str(dist.cpu_collectives))
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, RuntimeError) as e:
    jax.config.update('jax_cpu_collectives_implementation', previous)
    no_cluster = isinstance(e, ValueError) and 'coordinator_address' in str(e)
    already_running = (isinstance(e, RuntimeError)
                       and 'before any JAX' in str(e))
    if not explicit and (no_cluster or already_running):
      # 'auto' with nothing given: JAX found no cluster, or JAX already ran
      # in this process (a library caller, who on a cluster initialises the
      # runtime itself first). Single-process.
      return {'initialized': False}
    if isinstance(e, RuntimeError):
      raise RuntimeError(
          f'config.distributed: cannot start the distributed runtime ({e}); '
          'it must be initialised before any JAX computation in the '
          'process') from e
    raise ValueError(f'config.distributed: jax.distributed.initialize('
                     f'{kwargs}) failed: {e}') from e
  return {'initialized': True, 'process_index': jax.process_index(),
          'process_count': jax.process_count()}
