"""Evaluation: one jitted evaluator for training-time eval, --mode=eval, predict.

The eval and predict steps of ``flaxseg.train.step`` call
``flaxseg.inference.segment_logits`` with the :class:`inference.Settings` of
``config.eval`` (scales, flip, merge, sliding window) on the model built at
``config.eval.output_stride`` (0: the training stride), then the dense CRF
when ``config.eval.crf.enabled``. They are mapped over devices by
``DataParallel`` the same way for all three uses, so ``python -m
flaxseg.predict`` writes exactly the label maps the evaluator scores.

Reports: :func:`evaluate` streams the confusion matrix over the eval split
and keeps a few prediction panels (image | ground truth | prediction |
overlay), which go to ``WORKDIR/predictions/step_N`` and TensorBoard;
:func:`write_report` writes ``eval_STEP.json`` (mIoU, per-class IoU,
accuracies, confusion matrix) and ``confusion_STEP.png``.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Dict, Optional

import jax
import ml_collections
import numpy as np

from flaxseg import inference, models
from flaxseg import metrics as metrics_lib
from flaxseg import viz
from flaxseg.checkpoint import Checkpoints, CheckpointError, check_meta
from flaxseg.config import validate_config
from flaxseg.data import pipeline, voc
from flaxseg.train import distributed, parallel, step as step_lib
from flaxseg.train.builders import (build_model, class_names, dataset_root,
                                    initial_state, log, log_every_process,
                                    run_meta)
from flaxseg.train.state import TrainState


# -- settings -------------------------------------------------------------------
def crf_settings(config) -> Optional[Dict[str, Any]]:
  """``config.eval.crf`` as ``inference.crf_refine`` settings, or None when off."""
  crf = config.eval.get('crf')
  if crf is None or not crf.enabled:
    return None
  return {k: crf[k] for k in inference.CRF_KEYS}


def model_align_corners(config) -> bool:
  """The model's upsampling corner convention (used to rescale inputs)."""
  if 'align_corners' in config.model:
    return bool(config.model.align_corners)
  return bool(models.default_kwargs(config.model.name).get('align_corners',
                                                           False))


def inference_settings(config) -> inference.Settings:
  """The inference mode of ``config.eval``."""
  return inference.settings_from_config(config.eval,
                                        model_align_corners(config))


def inference_record(config) -> Dict[str, Any]:
  """The inference mode of ``config`` as JSON data, for reports."""
  settings = inference_settings(config)
  return {'scales': list(settings.scales), 'flip': settings.flip,
          'merge': settings.merge,
          'window': list(settings.window) if settings.window else None,
          'output_stride': int(config.eval.get('output_stride', 0) or 0) or
                           config.model.get('output_stride')}


def eval_apply_fn(config):
  """The evaluation model's ``apply`` at ``config.eval.output_stride``, or
  ``None`` when it is the training stride (then the state's own is used)."""
  stride = int(config.eval.get('output_stride', 0) or 0)
  if not stride or stride == config.model.get('output_stride'):
    return None
  return build_model(config, output_stride=stride).apply


def map_eval_step(config, dp: parallel.DataParallel):
  """``eval_step`` of ``config`` mapped over ``dp``'s devices."""
  crf = crf_settings(config)
  out_kinds = {'confusion': parallel.REPLICATED,
               'prediction': parallel.SHARDED}
  if crf is not None:
    out_kinds['confusion_no_crf'] = parallel.REPLICATED
  return dp.map(
      functools.partial(step_lib.eval_step,
                        num_classes=config.data.num_classes, crf=crf,
                        mean=tuple(config.data.mean),
                        std=tuple(config.data.std),
                        settings=inference_settings(config),
                        apply_fn=eval_apply_fn(config)),
      out_kinds)


def map_predict_step(config, dp: parallel.DataParallel,
                     probabilities: bool = False):
  """``predict_step`` of ``config`` mapped over ``dp``'s devices."""
  out_kinds = {'prediction': parallel.SHARDED}
  if probabilities:
    out_kinds['probabilities'] = parallel.SHARDED
  return dp.map(
      functools.partial(step_lib.predict_step, crf=crf_settings(config),
                        mean=tuple(config.data.mean),
                        std=tuple(config.data.std),
                        settings=inference_settings(config),
                        apply_fn=eval_apply_fn(config),
                        probabilities=probabilities),
      out_kinds)


# -- the eval split -------------------------------------------------------------
def eval_stream(config, records, bad_examples=None):
  """This process's eval batches of ``records`` (whole images, padded)."""
  data = config.data
  pad = int(data.eval_pad_size)
  return pipeline.eval_dataset(
      records, num_classes=data.num_classes,
      global_batch_size=data.eval_batch_size, pad_to=(pad, pad),
      process_index=jax.process_index(), process_count=jax.process_count(),
      mean=tuple(data.mean), std=tuple(data.std),
      on_bad_example=data.on_bad_example, bad_examples=bad_examples)


def evaluate(config, dp: parallel.DataParallel, p_eval, dstate, records,
             *, step: int, workdir: Optional[str] = None, writer=None
             ) -> Dict[str, Any]:
  """Runs the eval split; returns scores and writes prediction pictures.

  Args:
    config: run config.
    dp: the DataParallel in use.
    p_eval: the mapped ``eval_step`` (:func:`map_eval_step`).
    dstate: device state.
    records: eval records.
    step: the training step (for names and logs).
    workdir: where ``predictions/`` go (None: no pictures).
    writer: optional clu metric writer for TensorBoard images.

  Returns:
    The dict of ``metrics.segmentation_scores`` (after the CRF when
    ``config.eval.crf.enabled``) with ``confusion``; with the CRF on, also
    ``no_crf`` (the network's own scores on the same images) and ``crf`` (the
    settings used).
  """
  data = config.data
  if config.eval.num_images >= 0:
    records = records[:config.eval.num_images]
  bad_examples = pipeline.BadExamples()
  ds = eval_stream(config, records, bad_examples)
  cm = np.zeros((data.num_classes,) * 2, np.int64)
  cm_no_crf = np.zeros_like(cm)
  panels = []
  for batch in ds.as_numpy_iterator():
    inputs = {k: batch[k] for k in ('image', 'label', 'valid', 'height',
                                    'width')}
    out = p_eval(dstate, dp.put_batch(inputs))
    cm += dp.fetch(out['confusion']).astype(np.int64)
    if 'confusion_no_crf' in out:
      cm_no_crf += dp.fetch(out['confusion_no_crf']).astype(np.int64)
    if len(panels) < config.eval.num_visualize and jax.process_index() == 0:
      pred = dp.fetch(out['prediction'], parallel.SHARDED)
      for i in range(len(pred)):
        if batch['valid'][i] and len(panels) < config.eval.num_visualize:
          h, w = int(batch['height'][i]), int(batch['width'][i])
          image = viz.denormalize(batch['image'][i, :h, :w], data.mean,
                                  data.std)
          panels.append((int(batch['index'][i]), viz.prediction_panel(
              image, batch['label'][i, :h, :w], pred[i, :h, :w])))
  for message in bad_examples.take_new():
    log_every_process(f'eval left out an example: {message}')
  scores = metrics_lib.segmentation_scores(cm, class_names(config))
  scores['confusion'] = cm
  if config.data.on_bad_example == 'skip':
    # This process's; with several processes each logs its own.
    scores['skipped_examples'] = sorted(bad_examples.errors)
  if crf_settings(config) is not None:
    # The same images without the CRF: what the post-processing adds.
    scores['no_crf'] = metrics_lib.segmentation_scores(cm_no_crf,
                                                       class_names(config))
    scores['no_crf']['confusion'] = cm_no_crf
    scores['crf'] = crf_settings(config)
  if workdir and panels and jax.process_index() == 0:
    out_dir = os.path.join(workdir, 'predictions', f'step_{step}')
    for index, panel in panels:
      viz.save_rgb(os.path.join(out_dir, f'{records[index].id}.png'), panel)
    if writer is not None:
      writer.write_images(step, {f'eval/prediction_{i}': p[None]
                                 for i, (_, p) in enumerate(panels)})
  return scores


# -- reports --------------------------------------------------------------------
def scalar_scores(scores) -> Dict[str, float]:
  """TensorBoard scalars of an evaluation."""
  out = {'eval/miou': scores['miou'],
         'eval/pixel_accuracy': scores['pixel_accuracy'],
         'eval/mean_accuracy': scores['mean_accuracy']}
  out.update({f'eval_iou/{k}': v for k, v in scores['per_class'].items()
              if v == v})
  if 'no_crf' in scores:
    out['eval/miou_no_crf'] = scores['no_crf']['miou']
    out['eval/pixel_accuracy_no_crf'] = scores['no_crf']['pixel_accuracy']
  return out


def eval_summary(scores) -> str:
  """One log line: mIoU, and the network's own when the CRF is on."""
  text = f'mIoU {scores["miou"]:.4f}'
  if 'no_crf' in scores:
    text += f' with the dense CRF ({scores["no_crf"]["miou"]:.4f} without)'
  return text


def log_scores(scores) -> None:
  """Prints the per-class IoU table(s)."""
  if 'no_crf' in scores:
    log('without the dense CRF:\n' +
        metrics_lib.format_iou_table(scores['no_crf']))
    log(f'with the dense CRF ({scores["crf"]}):')
  log(metrics_lib.format_iou_table(scores))
  if 'no_crf' in scores:
    log(eval_summary(scores))


def _json_scores(scores) -> Dict[str, Any]:
  out = {k: v for k, v in scores.items() if k in (
      'miou', 'pixel_accuracy', 'mean_accuracy', 'per_class')}
  out['confusion'] = np.asarray(scores['confusion']).tolist()
  return out


def write_report(workdir: str, step: int, scores, config=None
                 ) -> Dict[str, str]:
  """Writes ``eval_STEP.json`` and ``confusion_STEP.png`` into ``workdir``.

  Args:
    workdir: the run directory.
    step: the evaluated step.
    scores: :func:`evaluate`'s result.
    config: the run config (records the inference mode; optional).

  Returns:
    ``{'json': path, 'confusion': path}`` (empty off process 0).
  """
  if jax.process_index() != 0:
    return {}
  out = _json_scores(scores)
  if 'no_crf' in scores:
    out['crf'] = scores['crf']
    out['no_crf'] = _json_scores(scores['no_crf'])
  out['step'] = step
  if 'skipped_examples' in scores:
    out['skipped_examples'] = scores['skipped_examples']
  if config is not None:
    out['inference'] = inference_record(config)
  path = os.path.join(workdir, f'eval_{step}.json')
  with open(path + '.tmp', 'w') as f:
    json.dump(out, f, indent=1, allow_nan=True)
  os.replace(path + '.tmp', path)
  picture = os.path.join(workdir, f'confusion_{step}.png')
  names = list(scores['per_class'])
  viz.save_rgb(picture, viz.confusion_picture(scores['confusion'], names))
  return {'json': path, 'confusion': picture}


# -- the eval entry point -------------------------------------------------------
def restore_for_eval(config, workdir: str, step: Optional[int] = None
                     ) -> TrainState:
  """The host state of ``workdir``'s latest (or given) checkpoint.

  Raises:
    CheckpointError: when there is no checkpoint, or it is another model's
      (naming the config keys that differ; nothing is compiled first).
  """
  ckpts = Checkpoints(os.path.join(workdir, 'checkpoints'), create=False)
  if ckpts.latest_step() is None:
    raise CheckpointError(f'no checkpoint in {ckpts.directory}')
  # Refuse another model's checkpoint before building (compiling) this one.
  # The data-stream position does not matter for inference.
  keys = ('model', 'num_classes')
  step = ckpts.latest_step() if step is None else step
  expected = run_meta(config)
  check_meta(ckpts.read_meta(step), expected, keys,
             os.path.join(ckpts.directory, str(step)))
  state = initial_state(config, build_model(config))
  tree, _ = ckpts.restore(state.checkpoint_tree(), expected, step,
                          check_keys=keys)
  return state.replace_from_checkpoint(tree)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        step: Optional[int] = None) -> Dict[str, Any]:
  """Evaluates the latest (or given) checkpoint of ``workdir`` on the eval split.

  Prints the per-class IoU table and writes ``WORKDIR/eval_STEP.json`` and
  ``WORKDIR/confusion_STEP.png`` (with ``config.eval.crf.enabled``: the CRF's
  scores, and the network's own under ``no_crf``).
  """
  validate_config(config)
  distributed.initialize(config.distributed)
  root = dataset_root(config, workdir)
  eval_records = voc.list_records(root, config.data.eval_split)
  dp = parallel.DataParallel(config.parallel)
  state = restore_for_eval(config, workdir, step)
  scores = evaluate(config, dp, map_eval_step(config, dp),
                    dp.put_state(state), eval_records, step=int(state.step),
                    workdir=workdir)
  log_scores(scores)
  paths = write_report(workdir, int(state.step), scores, config)
  if paths:
    log(f'wrote {paths["json"]} and {paths["confusion"]}')
  return scores
