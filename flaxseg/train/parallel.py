"""Data parallelism: the per-shard steps mapped with ``pmap`` or ``shard_map``.

``DataParallel`` hides the difference between the two mappings the trainer
offers (``config.parallel``):

* ``'pmap'`` (default, as the product card names it): the state is replicated
  with a leading device axis and batches are reshaped to
  ``[local_devices, per_device, ...]``.
* ``'shard_map'``: ``jax.jit(jax.shard_map(...))`` over a 1-D mesh named
  ``'batch'``; the state is a replicated global array and batches are global
  arrays sharded on their leading axis.

Both run the same per-shard function from ``flaxseg.train.step`` with the axis
name ``'batch'``, so they compute the same numbers. ``check_vma=False`` keeps
shard_map's autodiff semantics equal to pmap's: gradients of replicated
parameters are summed explicitly by the step, not implicitly by the
transpose of ``pvary``.
"""

from __future__ import annotations

import collections
import itertools
from typing import Any, Callable, Dict, Iterable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from flaxseg import collectives

AXIS = 'batch'
REPLICATED, SHARDED = 'replicated', 'sharded'


class DataParallel:
  """Maps per-shard functions over this process's devices.

  Args:
    mode: ``'pmap'`` or ``'shard_map'``.
    devices: devices to use (default: all; the global device list for
      shard_map, the process-local ones for pmap).
    reduction: ``'psum'`` or ``'ordered'`` (``config.train.reduction``): the
      mapped functions get the axis name as a plain string or as a
      `flaxseg.collectives.OrderedAxis`.
  """

  def __init__(self, mode: str = 'pmap', devices=None,
               reduction: str = 'psum'):
    if mode not in ('pmap', 'shard_map'):
      raise ValueError(f"config.parallel: unknown mode {mode!r} "
                       "(expected 'pmap' or 'shard_map')")
    self.mode = mode
    self.axis_name = collectives.axis_name_for(AXIS, reduction)
    if mode == 'pmap':
      self.devices = list(devices or jax.local_devices())
      # Arrays for pmap carry a leading device axis, laid out on this mesh.
      self.mesh = jax.sharding.Mesh(np.array(self.devices), (AXIS,))
    else:
      self.devices = list(devices or jax.devices())
      self.mesh = jax.sharding.Mesh(
          np.array(self.devices), (AXIS,),
          axis_types=(jax.sharding.AxisType.Auto,))
    self.local_devices = [d for d in self.devices
                          if d.process_index == jax.process_index()]
    # pmap's collectives span the devices it is given: with several
    # processes it must get the global list (each process still feeds and
    # receives only its local slice); process-local devices would make every
    # host train on its own.
    self.pmap_devices = (jax.devices() if devices is None
                         and jax.process_count() > 1 else self.local_devices)

  @property
  def num_devices(self) -> int:
    """Devices in the data-parallel axis (all processes)."""
    return len(self.devices) if self.mode == 'shard_map' else (
        len(self.devices) * jax.process_count())

  @property
  def num_local_devices(self) -> int:
    return len(self.local_devices)

  # -- state ----------------------------------------------------------------
  def put_state(self, state):
    """Places a host state on the devices, replicated."""
    if self.mode == 'pmap':
      n = len(self.local_devices)
      stacked = jax.tree.map(
          lambda x: np.broadcast_to(np.asarray(x)[None], (n,) + np.shape(x)),
          state)
      return jax.device_put(stacked, NamedSharding(self.mesh, P(AXIS)))
    # From host copies: a restored single-device array cannot be sent to
    # another process's devices, the same numpy value on every process can.
    return jax.device_put(jax.tree.map(np.asarray, state),
                          NamedSharding(self.mesh, P()))

  def get_state(self, state):
    """The device state as one host copy (this process's first replica).

    Read from a local shard only: with several processes, indexing or
    ``device_get`` of a global array is a computation every process must
    run in the same order, and Orbax's background saves run collectives of
    their own, so the two could interleave differently and deadlock.
    """
    if self.mode == 'pmap':
      return jax.tree.map(lambda x: host_local(x)[0], state)
    return jax.tree.map(host_local, state)

  # -- batches --------------------------------------------------------------
  def put_batch(self, batch: Dict[str, np.ndarray]):
    """Sends this process's part of a global batch to its devices."""
    n = self.num_local_devices
    first = next(iter(batch.values()))
    if first.shape[0] % n:
      raise ValueError(
          f'per-process batch of {first.shape[0]} does not split over {n} '
          'local devices: make config.data.batch_size a multiple of the '
          'device count')
    if self.mode == 'pmap':
      sharding = NamedSharding(self.mesh, P(AXIS))
      return jax.tree.map(
          lambda x: jax.device_put(
              np.asarray(x).reshape((n, x.shape[0] // n) + x.shape[1:]),
              sharding), batch)
    sharding = NamedSharding(self.mesh, P(AXIS))
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding,
                                                         np.asarray(x)), batch)

  def prefetch(self, batches: Iterable[Dict[str, np.ndarray]], size: int = 2
               ) -> Iterator[Any]:
    """Device-side prefetch: keeps ``size`` batches in flight."""
    queue = collections.deque()
    iterator = iter(batches)
    for batch in itertools.islice(iterator, size):
      queue.append(self.put_batch(batch))
    while queue:
      yield queue.popleft()
      for batch in itertools.islice(iterator, 1):
        queue.append(self.put_batch(batch))

  # -- functions ------------------------------------------------------------
  def map(self, fn: Callable, out_kinds, donate_state: bool = False):
    """Maps ``fn(state, batch, axis_name=...)`` over the data axis.

    Args:
      fn: per-shard function taking ``(state, batch)`` and ``axis_name``.
      out_kinds: pytree prefix of the outputs: ``REPLICATED`` for values that
        are equal on all shards (after a psum), ``SHARDED`` for per-example
        values.
      donate_state: donate the state buffers (train steps).

    Returns:
      A callable on device state and device batch.
    """
    def per_shard(state, batch):
      return fn(state, batch, axis_name=self.axis_name)
    donate = (0,) if donate_state else ()
    if self.mode == 'pmap':
      return jax.pmap(per_shard, axis_name=AXIS, donate_argnums=donate,
                      devices=self.pmap_devices)
    out_specs = jax.tree.map(lambda k: P() if k == REPLICATED else P(AXIS),
                             out_kinds)
    mapped = jax.shard_map(per_shard, mesh=self.mesh,
                           in_specs=(P(), P(AXIS)), out_specs=out_specs,
                           check_vma=False)
    return jax.jit(mapped, donate_argnums=donate)

  def fetch(self, value, kind: str = REPLICATED):
    """Brings a mapped output to the host as numpy.

    ``REPLICATED`` values come back whole; ``SHARDED`` ones as this
    process's rows (all rows with one process), in the order of the batch
    it fed to ``put_batch``.
    """
    # Local shards only (see get_state).
    if kind == SHARDED:
      rows = jax.tree.map(_local_rows, value)
      if self.mode == 'pmap':   # [local devices, per device, ...]
        return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), rows)
      return rows
    if self.mode == 'pmap':
      return jax.tree.map(lambda x: host_local(x)[0], value)
    return jax.tree.map(host_local, value)


def host_local(x) -> np.ndarray:
  """A host copy of one local shard of ``x`` (all of a replicated value;
  ``[1, ...]`` of a pmap-stacked one), without any cross-process step."""
  if not isinstance(x, jax.Array):
    return np.asarray(x)
  return np.asarray(x.addressable_shards[0].data)


def _local_rows(x) -> np.ndarray:
  """The rows of a batch-sharded array held by this process, in order."""
  if not isinstance(x, jax.Array):
    return np.asarray(x)
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])
