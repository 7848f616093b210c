"""Starting a fresh run from existing weights.

Two ``config.model`` keys, applied in this order to the freshly initialised
state of a run that has no checkpoint of its own (a run that does resumes
from it and ignores both):

* ``backbone_init``: ImageNet weights for the model's backbone, either a
  directory written by ``python -m flaxseg.convert backbone`` or a
  torchvision ``.pth`` / ``.safetensors`` file of the backbone's classifier
  (``torchvision.models.resnet101(weights=...).state_dict()``), converted on
  the fly. The architecture comes from the model name
  (:func:`flaxseg.convert.backbone_arch`); the rest of the model keeps its
  initialisation.
* ``init_from``: another run's checkpoint, or a whole converted model
  (``python -m flaxseg.convert model``): every array there must exist in this
  model with the same shape; arrays it lacks keep their values (CRF-RNN's
  stage 2 from an FCN-8s run).

The optimizer state is re-initialised for the new parameters; the step stays
0. Any array that does not fit is named in the error, before anything is
written.
"""

from __future__ import annotations

import os
from typing import Callable

from flaxseg import convert
from flaxseg.checkpoint import CheckpointError, load_variables, merge_variables
from flaxseg.train.state import TrainState

#: The config.model keys this module reads (never passed to the model).
KEYS = ('backbone_init', 'init_from')


def _report(what, source, report, log):
  kept = report['kept']
  text = (f'{what}: {len(report["loaded"])} arrays from {source}; '
          f'{len(kept)} keep their initial values')
  if kept:
    text += ': ' + ', '.join(kept[:8]) + (' ...' if len(kept) > 8 else '')
  log(text)


def _with(state: TrainState, merged) -> TrainState:
  return state.replace(params=merged['params'],
                       batch_stats=merged['batch_stats'],
                       opt_state=state.tx.init(merged['params']))


def init_backbone(config, state: TrainState,
                  log: Callable[[str], None] = print) -> TrainState:
  """``state`` with ``config.model.backbone_init``'s weights (if set).

  Raises:
    CheckpointError: naming the source and every array that does not fit.
  """
  path = config.model.get('backbone_init') or ''
  if not path:
    return state
  try:
    arch = convert.backbone_arch(config.model.name)
    if os.path.isfile(path):
      source = os.path.abspath(path)
      variables = convert.import_backbone(convert.load_state_dict(path), arch,
                                          source=source)
    else:
      variables, meta = load_variables(path)
      source = meta['source']
      if meta.get('kind') != 'backbone' or meta.get('arch') != arch:
        raise CheckpointError(
            f'backbone_init {source}: holds {meta.get("kind", "a run")} '
            f'{meta.get("arch") or meta.get("model", {}).get("name", "?")}, '
            f'but {config.model.name} needs a {arch} backbone (python -m '
            f'flaxseg.convert backbone --arch {arch} ...)')
    variables = convert.fit_backbone(
        variables, {'params': state.params}, source=source)
  except convert.ConversionError as e:
    raise CheckpointError(f'backbone_init: {e}') from e
  merged, report = merge_variables(
      {'params': state.params, 'batch_stats': state.batch_stats}, variables,
      source)
  _report(f'backbone_init ({arch})', source, report, log)
  return _with(state, merged)


def init_from_checkpoint(config, state: TrainState,
                         log: Callable[[str], None] = print) -> TrainState:
  """``state`` with the weights of ``config.model.init_from`` (if set).

  Raises:
    CheckpointError: naming the path, and every array that does not fit.
  """
  source = config.model.get('init_from') or ''
  if not source:
    return state
  loaded, meta = load_variables(source)
  merged, report = merge_variables(
      {'params': state.params, 'batch_stats': state.batch_stats}, loaded,
      meta['source'])
  _report(f'init_from (model {meta.get("model", {}).get("name", "?")}, '
          f'step {meta.get("step", "?")})', meta['source'], report, log)
  return _with(state, merged)


def warm_start(config, state: TrainState,
               log: Callable[[str], None] = print) -> TrainState:
  """:func:`init_backbone`, then :func:`init_from_checkpoint`."""
  return init_from_checkpoint(config, init_backbone(config, state, log), log)
