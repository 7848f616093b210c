"""Orbax checkpoints of the training state, with a metadata record.

Each checkpoint step directory holds two Orbax items:

* ``state``: the arrays of ``TrainState.checkpoint_tree()`` (step, params,
  batch_stats, opt_state), saved with ``StandardSave``;
* ``meta``: JSON describing what produced them: the model section of the
  config, the number of classes, and the data-stream position (seed, global
  batch size, examples consumed). Because the training stream is a pure
  function of ``(seed, step)`` (see ``flaxseg.data.pipeline``), the step and
  these two numbers are all it takes to continue the stream exactly.

Restoring checks ``meta`` against the current run before touching the arrays,
so a checkpoint from a different model fails with a message naming the keys
that differ, and nothing on disk is modified by a failed restore.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import traverse_util


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored into the current run."""


def _diff(saved: Dict[str, Any], current: Dict[str, Any], prefix: str):
  keys = sorted(set(saved) | set(current))
  out = []
  for k in keys:
    a, b = saved.get(k, '<absent>'), current.get(k, '<absent>')
    if isinstance(a, dict) and isinstance(b, dict):
      out += _diff(a, b, f'{prefix}{k}.')
    elif _normalise(a) != _normalise(b):
      out.append(f'{prefix}{k}: checkpoint has {a!r}, config has {b!r}')
  return out


def _normalise(v):
  return list(v) if isinstance(v, tuple) else v


def check_meta(meta: Dict[str, Any], expected: Dict[str, Any],
               keys: Tuple[str, ...], where: str) -> None:
  """Raises ``CheckpointError`` naming each of ``keys`` where ``meta`` (a
  checkpoint's record) and ``expected`` (the current config's) differ."""
  problems = _diff({k: meta.get(k, '<absent>') for k in keys},
                   {k: expected.get(k, '<absent>') for k in keys}, '')
  if problems:
    raise CheckpointError(
        f'checkpoint {where} was written by a different model/config:\n  '
        + '\n  '.join(problems) +
        '\nUse another --workdir, or restore the matching config.')


class Checkpoints:
  """A thin wrapper over ``ocp.CheckpointManager``.

  Args:
    directory: where step directories live (made absolute).
    max_to_keep: how many recent checkpoints to keep.
    async_save: write in a background thread (call ``wait`` before exit).
    create: create ``directory`` if missing (``False`` for read-only use).
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3,
               async_save: bool = True, create: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=create,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    """The newest complete checkpoint's step, or None."""
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, step: int, tree: Any, meta: Dict[str, Any],
           force: bool = True) -> bool:
    """Saves ``tree`` (host or device arrays) and ``meta`` at ``step``."""
    return self.manager.save(
        int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
        force=force)

  def read_meta(self, step: Optional[int] = None) -> Dict[str, Any]:
    """The metadata record of ``step`` (default: latest)."""
    step = self.latest_step() if step is None else step
    restored = self.manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored['meta'])

  def restore(self, target: Any, expected_meta: Dict[str, Any],
              step: Optional[int] = None,
              check_keys: Tuple[str, ...] = ('model', 'num_classes')
              ) -> Tuple[Any, Dict[str, Any]]:
    """Restores the arrays of ``step`` shaped like ``target``.

    Args:
      target: a tree with the structure, shapes and dtypes to restore into
        (e.g. a freshly initialised ``checkpoint_tree()``).
      expected_meta: the current run's metadata; the ``check_keys`` entries
        must equal the checkpoint's.
      step: which step (default: latest).
      check_keys: meta entries that must match.

    Returns:
      ``(tree, meta)``.

    Raises:
      CheckpointError: naming the checkpoint and what does not match.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'no checkpoint in {self.directory}')
    where = os.path.join(self.directory, str(step))
    try:
      meta = self.read_meta(step)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f'checkpoint {where}: cannot read its metadata ({e})') from e
    check_meta(meta, expected_meta, check_keys, where)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(
              abstract)))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f'checkpoint {where} does not fit the current model: {e}') from e
    return restored['state'], meta

  def wait(self):
    """Blocks until pending asynchronous saves are on disk."""
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


# -- initialising a run from another run's weights ----------------------------
def checkpoint_location(path: str, purpose: str = 'init_from'
                        ) -> Tuple[str, Optional[int]]:
  """``(checkpoints directory, step or None)`` for a workdir, a checkpoints
  directory or one step directory (``purpose`` names the option in errors)."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f'{purpose}: {path} is not a directory (expected a '
                          'flaxseg workdir, its checkpoints/ or a step '
                          'directory)')
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    return os.path.join(path, 'checkpoints'), None
  name = os.path.basename(path)
  if name.isdigit() and os.path.isdir(os.path.join(path, 'state')):
    return os.path.dirname(path), int(name)
  return path, None


def load_variables(path: str, purpose: str = 'init_from'
                   ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """The model variables and metadata of another run's checkpoint.

  Args:
    path: a flaxseg workdir (its latest checkpoint), its ``checkpoints``
      directory, or one step directory (``.../checkpoints/STEP``).
    purpose: the option being served, for messages.

  Returns:
    ``({'params': ..., 'batch_stats': ...}, meta)`` as host arrays; nothing
    is written or created.

  Raises:
    CheckpointError: naming ``path`` when it holds no readable checkpoint.
  """
  directory, step = checkpoint_location(path, purpose)
  ckpts = Checkpoints(directory, async_save=False, create=False)
  try:
    step = ckpts.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'{purpose}: no checkpoint in {directory}')
    where = os.path.join(directory, str(step))
    try:
      meta = ckpts.read_meta(step)
      restored = ckpts.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f'{purpose}: cannot read checkpoint {where} '
                            f'({e})') from e
  finally:
    ckpts.close()
  state = restored['state']
  variables = {'params': jax.device_get(state['params']),
               'batch_stats': jax.device_get(state.get('batch_stats') or {})}
  return variables, dict(meta, source=where)


def merge_variables(target: Dict[str, Any], source: Dict[str, Any],
                    source_name: str, purpose: str = 'init_from'
                    ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """``target`` with every array that ``source`` has at the same path.

  Paths of ``source`` must all exist in ``target`` with the same shapes; paths
  only in ``target`` keep their values (e.g. CRF-RNN's ``crf`` layer when
  starting from FCN-8s).

  Args:
    target: freshly initialised ``{'params', 'batch_stats'}``.
    source: loaded variables (same collections).
    source_name: for messages (the checkpoint path).
    purpose: the option being served, for messages.

  Returns:
    ``(merged, {'loaded': [...], 'kept': [...]})`` with ``/``-joined paths.

  Raises:
    CheckpointError: naming every unexpected or wrongly shaped array, or when
      nothing matches.
  """
  merged, loaded, kept, problems = {}, [], [], []
  for collection in ('params', 'batch_stats'):
    tgt = traverse_util.flatten_dict(target.get(collection) or {}, sep='/')
    src = traverse_util.flatten_dict(source.get(collection) or {}, sep='/')
    for key in sorted(set(src) - set(tgt)):
      problems.append(f'{collection}/{key}: in the checkpoint, not in the '
                      'model')
    out = {}
    for key, value in tgt.items():
      if key not in src:
        kept.append(f'{collection}/{key}')
        out[key] = value
      elif tuple(src[key].shape) != tuple(value.shape):
        problems.append(f'{collection}/{key}: checkpoint shape '
                        f'{tuple(src[key].shape)}, model shape '
                        f'{tuple(value.shape)}')
      else:
        loaded.append(f'{collection}/{key}')
        out[key] = jnp.asarray(src[key], value.dtype)
    merged[collection] = traverse_util.unflatten_dict(out, sep='/')
  if problems:
    raise CheckpointError(f'{purpose} {source_name}: the checkpoint does not '
                          'fit the model:\n  ' + '\n  '.join(problems))
  if not loaded:
    raise CheckpointError(f'{purpose} {source_name}: no array of the '
                          'checkpoint matches the model')
  return merged, {'loaded': loaded, 'kept': kept}
