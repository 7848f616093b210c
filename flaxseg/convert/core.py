"""Reading state dicts and turning them into flaxseg variables.

``load_state_dict`` reads ``.pth``/``.pt`` files with
``torch.load(..., weights_only=True)`` (never a plain unpickle) and
``.safetensors`` files with the ``safetensors`` package (no torch needed).
``convert`` applies a mapping table (:mod:`flaxseg.convert.tables`) against
the shapes of the target model and reports, in one error, every tensor that
is missing, unexpected or of the wrong shape.
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np
from flax import traverse_util

from flaxseg.convert.errors import ConversionError
from flaxseg.convert.tables import Entry, tensor_names


def _to_numpy(value, key: str, path: str) -> np.ndarray:
  if hasattr(value, 'detach'):            # a torch.Tensor
    value = value.detach().cpu()
    if str(value.dtype) == 'torch.bfloat16':
      value = value.float()
    value = value.numpy()
  value = np.asarray(value)
  if value.dtype.kind not in 'fiub':
    raise ConversionError(f'{path}: tensor {key!r} has dtype {value.dtype}, '
                          'not a number')
  return value


def _unwrap(obj, path: str) -> Mapping[str, Any]:
  """The tensor mapping inside a checkpoint (``state_dict``/``model`` keys)."""
  if hasattr(obj, 'state_dict') and callable(obj.state_dict):
    obj = obj.state_dict()
  if isinstance(obj, Mapping):
    for key in ('state_dict', 'model', 'model_state_dict'):
      if key in obj and isinstance(obj[key], Mapping):
        return obj[key]
    return obj
  raise ConversionError(f'{path} holds a {type(obj).__name__}, not a state '
                        'dict (a mapping of names to tensors)')


def load_state_dict(path: str) -> Dict[str, np.ndarray]:
  """The tensors of a torch checkpoint or a safetensors file, as numpy.

  Args:
    path: ``.safetensors`` (read without torch), or ``.pth``/``.pt``/``.bin``
      (``torch.load(path, map_location='cpu', weights_only=True)``; a
      ``{'state_dict': ...}`` or ``{'model': ...}`` wrapper is opened, a
      ``module.`` prefix from ``DataParallel`` is removed).

  Returns:
    ``{name: float32 or integer array}``.

  Raises:
    ConversionError: naming the file when it is missing, unreadable or not a
      state dict.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ConversionError(f'weights file {path} does not exist')
  if path.endswith('.safetensors'):
    try:
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ConversionError('reading .safetensors needs the safetensors '
                            'package (pip install safetensors)') from e
    try:
      raw = load_file(path)
    except Exception as e:  # pylint: disable=broad-except
      raise ConversionError(f'cannot read {path} as safetensors: {e}') from e
  else:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ConversionError(f'reading {path} needs torch (pip install torch), '
                            'or convert it to .safetensors') from e
    try:
      raw = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      raise ConversionError(f'cannot read {path} with torch.load('
                            f'weights_only=True): {e}') from e
    raw = _unwrap(raw, path)
  out = {}
  for key, value in raw.items():
    key = str(key)
    if key.startswith('module.'):
      key = key[len('module.'):]
    out[key] = _to_numpy(value, key, path)
  if not out:
    raise ConversionError(f'{path} holds no tensors')
  return out


def _flax_array(entry: Entry, leaf: str, value: np.ndarray,
                target_shape: Optional[Tuple[int, ...]]) -> np.ndarray:
  """One torch tensor in flaxseg's layout (target_shape: the model's)."""
  if leaf != 'kernel':
    return value
  if entry.kind == 'linear_conv':
    if value.ndim != 2:
      return value        # reported as a shape mismatch
    if target_shape is None or len(target_shape) != 4:
      raise ConversionError(f'{entry.torch}.weight: a Linear layer needs the '
                            'target conv kernel shape')
    kh, kw, cin, _ = target_shape
    if value.shape[1] != kh * kw * cin:
      return value
    value = value.reshape(value.shape[0], cin, kh, kw)
  if value.ndim == 4:
    return np.transpose(value, (2, 3, 1, 0))
  return value


def convert(state_dict: Mapping[str, np.ndarray], table: Sequence[Entry],
            target: Mapping[str, Any], *, ignored: Iterable[str] = (),
            source: str = 'state dict', strict: bool = True
            ) -> Dict[str, Dict[str, Any]]:
  """Variables for ``target`` from ``state_dict`` through ``table``.

  Args:
    state_dict: torch names -> arrays (:func:`load_state_dict`).
    table: the mapping entries of the model family.
    target: the model's (abstract) variables, ``{'params', 'batch_stats'}``
      with arrays or ``jax.ShapeDtypeStruct`` leaves: the shapes to match.
    ignored: regexes of torch keys to drop silently.
    source: names the state dict in messages (its file).
    strict: every ``target`` leaf must be produced (whole-model import);
      ``False`` converts what the table covers (backbones).

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` nested dicts of float32 numpy
    arrays, in the model's layout.

  Raises:
    ConversionError: one message listing every missing, unexpected or
      wrongly shaped tensor (torch name, flaxseg path and both shapes).
  """
  flat_target = {c: traverse_util.flatten_dict(dict(target.get(c) or {}),
                                               sep='/')
                 for c in ('params', 'batch_stats')}
  patterns = [re.compile(p) for p in ignored]
  used, problems = set(), []
  out = {'params': {}, 'batch_stats': {}}
  for entry in table:
    for key, (collection, leaf) in tensor_names(entry).items():
      path = f'{entry.flax}/{leaf}'
      want = flat_target[collection].get(path)
      if key not in state_dict:
        problems.append(f'missing: {key} (for {collection}/{path})')
        continue
      used.add(key)
      if want is None:
        problems.append(f'{key}: the model has no {collection}/{path}')
        continue
      value = _flax_array(entry, leaf, state_dict[key], tuple(want.shape))
      if tuple(value.shape) != tuple(want.shape):
        problems.append(f'{key}: shape {tuple(state_dict[key].shape)} does '
                        f'not fit {collection}/{path} {tuple(want.shape)}')
        continue
      out[collection][path] = np.asarray(value, np.float32)
  for key in sorted(set(state_dict) - used):
    if not any(p.search(key) for p in patterns):
      problems.append(f'unexpected: {key} {tuple(state_dict[key].shape)}')
  if strict:
    covered = {(c, f'{e.flax}/{leaf}') for e in table
               for c, leaf in tensor_names(e).values()}
    for collection, leaves in flat_target.items():
      for path in sorted(leaves):
        if (collection, path) not in covered:
          problems.append(f'not in the table: {collection}/{path}')
  if problems:
    raise ConversionError(
        f'{source} does not fit the model ({len(problems)} problem(s)):\n  '
        + '\n  '.join(problems))
  return {c: traverse_util.unflatten_dict(v, sep='/') for c, v in out.items()}
