"""Cross-device sums, optionally in a fixed order (``config.train.reduction``).

``jax.lax.psum`` leaves the order of the additions to the collective's
implementation: XLA's in-process all-reduce for the devices of one process,
Gloo's or NCCL's ring/tree algorithms across processes. Float32 addition is
not associative, so one process with 4 devices and 2 processes with 2 devices
each compute the same step up to rounding, and an optimiser such as Adam
(which divides by the gradient's running magnitude) grows those ulps into
visible differences within a few steps.

``reduction='ordered'`` names the data axis with :class:`OrderedAxis`
instead of a plain string. Every sum over it (gradients, losses, the
valid-pixel count, synchronised BatchNorm statistics) then becomes an
``all_gather`` (which only moves data) followed by a sum over the gathered
axis in device order, the same program whatever the topology, so the sums are
bit-identical across process and device layouts (whether a whole training
step is also depends on XLA compiling the rest of it identically for each
layout: on Intel CPUs it did, on AMD EPYC it differs in the last bits from
the second step on; ``tests/train/test_multihost.py``). Its derivative is the same
ordered sum of the cotangents (the transpose ``psum`` has under ``pmap``).
It costs ``n`` times the memory of each summed array and an all-gather's
traffic instead of an all-reduce's: a reproducibility setting, not a fast
one. The default, ``'psum'``, keeps ``jax.lax.psum``.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

REDUCTIONS = ('psum', 'ordered')


class OrderedAxis(str):
  """A mapped axis name whose sums are done in device order.

  It equals (and hashes like) the plain name, so ``pmap``/``shard_map`` and
  every ``axis_index`` see the same axis; only :func:`psum` and :func:`pmean`
  (and the BatchNorm built by ``layers.make_norm``) look at its type.
  """


def axis_name_for(name: Optional[str], reduction: str) -> Optional[str]:
  """``name`` marked for ``reduction`` (``'psum'`` or ``'ordered'``)."""
  if reduction not in REDUCTIONS:
    raise ValueError(f'config.train.reduction={reduction!r}: expected one of '
                     f'{REDUCTIONS}')
  if name is None or reduction == 'psum':
    return None if name is None else str(name)
  return OrderedAxis(name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _ordered_sum(x, axis_name):
  return jnp.sum(jax.lax.all_gather(x, axis_name), axis=0)


def _ordered_sum_fwd(x, axis_name):
  return _ordered_sum(x, axis_name), None


def _ordered_sum_bwd(axis_name, _, ct):
  return (_ordered_sum(ct, axis_name),)


_ordered_sum.defvjp(_ordered_sum_fwd, _ordered_sum_bwd)


def psum(x, axis_name: Optional[str]):
  """Sum of ``x`` (a pytree) over ``axis_name``; identity for None."""
  if axis_name is None:
    return x
  if isinstance(axis_name, OrderedAxis):
    return jax.tree.map(lambda v: _ordered_sum(v, axis_name), x)
  return jax.lax.psum(x, axis_name)


def pmean(x, axis_name: Optional[str]):
  """Mean of ``x`` (a pytree) over ``axis_name``; identity for None."""
  if axis_name is None:
    return x
  if isinstance(axis_name, OrderedAxis):
    n = jax.lax.psum(1, axis_name)   # a static size: no data moves
    return jax.tree.map(lambda v: _ordered_sum(v, axis_name) / n, x)
  return jax.lax.pmean(x, axis_name)
