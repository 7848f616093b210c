"""A run's config and weights, for the inference tools (predict, export).

Given ``--workdir`` (a training run) or ``--checkpoint`` (a run, its
``checkpoints/``, one step directory, or what ``python -m flaxseg.convert``
writes) and optionally ``--config``, :func:`resolve_config` finds the config,
:func:`apply_overrides` applies the command line's inference-mode flags and
:func:`load_state` loads the weights, refusing a checkpoint of another model
with a message naming what differs.
"""

from __future__ import annotations

import os
from typing import Optional

from absl import flags
from ml_collections import config_flags

from flaxseg import checkpoint as ckpt_lib
from flaxseg.config import default_config
from flaxseg.train import builders, evaluator


def define_flags() -> None:
  """The flags predict and export share: where the run is, and the
  inference-mode overrides (absl; call once, from the command's entry)."""
  config_flags.DEFINE_config_file(
      'config', None, "Recipe (PATH[:VARIANT]); default: the run's "
      'config.json.', lock_config=False)
  flags.DEFINE_string('workdir', None, 'A training run (its latest '
                      'checkpoint).')
  flags.DEFINE_string('checkpoint', None,
                      'A checkpoint: a run, its checkpoints/ or one step '
                      'directory (also what python -m flaxseg.convert '
                      'writes).')
  flags.DEFINE_integer('step', None, 'With --workdir: which checkpoint step.')
  flags.DEFINE_string('out', None, 'Output directory.')
  flags.DEFINE_list('scales', None, 'Input scales (config.eval.scales).')
  flags.DEFINE_bool('flip', None, 'Add left/right flips (config.eval.flip).')
  flags.DEFINE_integer('output_stride', None,
                       'Output stride at inference (config.eval.output_stride).')
  flags.DEFINE_bool('crf', None, 'Dense-CRF post-processing '
                    '(config.eval.crf.enabled).')


def from_flags(values, window: Optional[int] = None):
  """``(config, state)`` from the flags of :func:`define_flags`.

  Raises:
    ValueError: for flags that do not name exactly one run or checkpoint.
  """
  from flaxseg.config import validate_config  # pylint: disable=g-import-not-at-top
  if not values.out:
    raise ValueError('--out is required')
  if bool(values.workdir) == bool(values.checkpoint):
    raise ValueError('give exactly one of --workdir and --checkpoint')
  config = resolve_config(values.config, values.workdir, values.checkpoint)
  config = apply_overrides(config, scales=values.scales, flip=values.flip,
                           window=window, output_stride=values.output_stride,
                           crf=values.crf)
  validate_config(config)
  return config, load_state(config, values.workdir, values.checkpoint,
                            values.step)


def resolve_config(config, workdir: Optional[str], checkpoint: Optional[str]):
  """The run config: ``config``, else the run's ``config.json``, else one
  built from the checkpoint's metadata (model section and class count)."""
  if config is not None:
    return config
  if workdir:
    return builders.load_run_config(workdir)
  directory, step = ckpt_lib.checkpoint_location(checkpoint, 'checkpoint')
  run_dir = os.path.dirname(directory)
  if os.path.exists(os.path.join(run_dir, builders.CONFIG_FILE)):
    return builders.load_run_config(run_dir)
  ckpts = ckpt_lib.Checkpoints(directory, async_save=False, create=False)
  try:
    step = ckpts.latest_step() if step is None else step
    if step is None:
      raise ckpt_lib.CheckpointError(f'no checkpoint in {directory}')
    meta = ckpts.read_meta(step)
  finally:
    ckpts.close()
  if 'model' not in meta or 'num_classes' not in meta:
    raise ckpt_lib.CheckpointError(
        f'checkpoint {directory}/{step} records no model (a backbone-only '
        'conversion?): pass the recipe with --config')
  c = default_config()
  c.model = builders.config_from_dict(dict(meta['model']))
  c.data.num_classes = int(meta['num_classes'])
  c.data.dataset = 'voc'
  return c


def apply_overrides(config, *, scales=None, flip=None, window=None,
                    output_stride=None, crf=None):
  """``config`` with the command line's inference-mode flags applied."""
  if scales is not None:
    try:
      config.eval.scales = tuple(float(s) for s in scales)
    except ValueError as e:
      raise ValueError(f'--scales={",".join(scales)}: {e}') from e
  if flip is not None:
    config.eval.flip = bool(flip)
  if window is not None:
    config.eval.window = (int(window), int(window))
  if output_stride is not None:
    config.eval.output_stride = int(output_stride)
  if crf is not None:
    config.eval.crf.enabled = bool(crf)
  return config


def load_state(config, workdir: Optional[str], checkpoint: Optional[str],
               step: Optional[int]):
  """The host state to predict with, checked against ``config``.

  Raises:
    CheckpointError: naming the checkpoint and what does not match.
  """
  if workdir and not checkpoint:
    return evaluator.restore_for_eval(config, workdir, step)
  variables, meta = ckpt_lib.load_variables(checkpoint, purpose='checkpoint')
  ckpt_lib.check_meta(meta, builders.run_meta(config),
                      ('model', 'num_classes'), meta['source'])
  state = builders.initial_state(config, builders.build_model(config))
  merged, report = ckpt_lib.merge_variables(
      {'params': state.params, 'batch_stats': state.batch_stats}, variables,
      meta['source'], purpose='checkpoint')
  if report['kept']:
    raise ckpt_lib.CheckpointError(
        f'checkpoint {meta["source"]} lacks arrays the model needs: '
        + ', '.join(report['kept'][:10]) +
        (' ...' if len(report['kept']) > 10 else ''))
  return state.replace(params=merged['params'],
                       batch_stats=merged['batch_stats'])
