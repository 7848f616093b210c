"""The training loop: ``train_and_evaluate`` and ``evaluate_checkpoint``.

One run = data (VOC reader + tf.data), model from the registry, optax
optimizer, the per-shard steps mapped by ``DataParallel``, Orbax checkpoints in
``WORKDIR/checkpoints`` (resumed automatically from the latest), periodic
evaluation (streaming confusion matrix -> mIoU, after dense-CRF
post-processing when ``config.eval.crf.enabled``, with the network's own mIoU
reported beside it), logs on stdout and in TensorBoard (``WORKDIR``),
prediction pictures in ``WORKDIR/predictions``.

Resuming is exact: the state is restored bit for bit, the data stream restarts
at the restored step (it is a pure function of seed and step), and dropout keys
are derived from the step.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metric_writers

from flaxseg import metrics as metrics_lib
from flaxseg import models, viz
from flaxseg.checkpoint import Checkpoints, CheckpointError
from flaxseg.config import validate_config
from flaxseg.data import pipeline, synthetic, voc
from flaxseg.train import optim, parallel, step as step_lib, warm_start
from flaxseg.train.state import TrainState, create_train_state


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


# -- building blocks ---------------------------------------------------------
def dataset_root(config, workdir: str) -> str:
  """The VOC root to read; generates the synthetic set when configured."""
  data = config.data
  if data.dataset == 'synthetic':
    root = data.root or os.path.join(workdir, 'synthetic_voc')
    if len(synthetic.SYNTH_CLASSES) != data.num_classes:
      raise ValueError(
          f'config.data.num_classes is {data.num_classes} but the synthetic '
          f'set has {len(synthetic.SYNTH_CLASSES)} classes')
    return ensure_synthetic(root, data.synthetic.to_dict(), config.seed)
  if data.dataset != 'voc':
    raise ValueError(f"config.data.dataset: unknown dataset {data.dataset!r} "
                     "(expected 'voc' or 'synthetic')")
  if not data.root:
    raise ValueError('config.data.root is empty: point it at VOCdevkit/VOC2012 '
                     "(or use config.data.dataset='synthetic')")
  return data.root


def ensure_synthetic(root: str, params: Dict[str, int], seed: int) -> str:
  """Generates the synthetic VOC tree at ``root`` once; returns VOC2012's path.

  The tree is written to a temporary sibling and renamed into place, so an
  interrupted generation never leaves a half-written dataset behind; a JSON
  marker records the generator arguments, and a tree made with other
  arguments is refused rather than silently reused.
  """
  wanted = dict(params, seed=int(seed))
  marker = os.path.join(root, 'flaxseg_synthetic.json')
  voc_root = os.path.join(root, 'VOCdevkit', 'VOC2012')
  if os.path.exists(marker):
    with open(marker) as f:
      found = json.load(f)
    if found != wanted:
      raise ValueError(
          f'{root} holds a synthetic set generated with {found}, but the '
          f'config asks for {wanted}: delete it or set config.data.root')
    return voc_root
  if os.path.exists(root) and os.listdir(root):
    raise ValueError(f'{root} exists and is not a flaxseg synthetic set '
                     f'(no {os.path.basename(marker)}): refusing to write there')
  tmp = f'{root}.tmp-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  _log(f'generating the synthetic VOC-format set in {root} ...')
  synthetic.generate_voc_tree(
      tmp, num_train=params['num_train'], num_val=params['num_val'],
      seed=int(seed), image_size=(params['min_size'], params['max_size']))
  with open(os.path.join(tmp, os.path.basename(marker)), 'w') as f:
    json.dump(wanted, f)
  if os.path.exists(root):
    os.rmdir(root)
  os.replace(tmp, root)
  return voc_root


def class_names(config):
  """Class names for reports."""
  if config.data.dataset == 'synthetic':
    return list(synthetic.SYNTH_CLASSES)
  names = list(voc.VOC_CLASSES)
  return names if len(names) == config.data.num_classes else None


def build_model(config, axis_name: Optional[str] = parallel.AXIS):
  """The model named by ``config.model`` with synchronised BatchNorm."""
  kwargs = dict(config.model)
  name = kwargs.pop('name')
  for key in warm_start.KEYS:      # the trainer's, not the model's
    kwargs.pop(key, None)
  accepted = models.accepted_kwargs(name)
  # Models that need raw colours (CRF-RNN) undo the data's normalisation.
  for key, value in (('pixel_mean', config.data.mean),
                     ('pixel_std', config.data.std)):
    if key in accepted and key not in kwargs:
      kwargs[key] = tuple(value)
  return models.create_model(name, num_classes=config.data.num_classes,
                             bn_axis_name=axis_name, **kwargs)


def initial_state(config, model) -> TrainState:
  """A fresh state (step 0) on the host."""
  tx = optim.create_optimizer(config.optim, config.train.num_steps)
  crop = int(config.data.crop_size)
  return create_train_state(model, tx, jax.random.key(config.seed),
                            (1, crop, crop, 3))


def run_meta(config) -> Dict[str, Any]:
  """What a checkpoint records about the run that wrote it."""
  # init_from / backbone_init only say where step 0 came from: not part of
  # the model, so a run resumes (or is evaluated) whatever they say.
  model = {k: v for k, v in config.model.to_dict().items()
           if k not in warm_start.KEYS}
  return {
      'model': model,
      **{k: config.model.get(k) or '' for k in warm_start.KEYS},
      'num_classes': int(config.data.num_classes),
      'data': {'seed': int(config.seed),
               'global_batch_size': int(config.data.batch_size),
               'crop_size': int(config.data.crop_size)},
  }


def crf_settings(config) -> Optional[Dict[str, Any]]:
  """``config.eval.crf`` as ``step.crf_refine`` settings, or None when off."""
  crf = config.eval.get('crf')
  if crf is None or not crf.enabled:
    return None
  return {k: crf[k] for k in step_lib.CRF_KEYS}


def restore_latest(ckpts: Checkpoints, state: TrainState, config,
                   step: Optional[int] = None) -> TrainState:
  """``state`` with the arrays of the latest (or given) checkpoint."""
  tree, meta = ckpts.restore(state.checkpoint_tree(), run_meta(config), step,
                             check_keys=('model', 'num_classes', 'data'))
  del meta
  return state.replace_from_checkpoint(tree)


def restore_for_eval(config, workdir: str, step: Optional[int] = None
                     ) -> TrainState:
  """The host state of ``workdir``'s latest (or given) checkpoint.

  Raises:
    CheckpointError: when there is no checkpoint (or it is another model's).
  """
  state = initial_state(config, build_model(config))
  ckpts = Checkpoints(os.path.join(workdir, 'checkpoints'))
  if ckpts.latest_step() is None:
    raise CheckpointError(f'no checkpoint in {ckpts.directory}')
  return restore_latest(ckpts, state, config, step)


def _train_stream(config, records, start_step: int):
  data = config.data
  ds = pipeline.train_dataset(
      records, num_classes=data.num_classes,
      global_batch_size=data.batch_size,
      crop_size=(data.crop_size, data.crop_size), seed=config.seed,
      start_step=start_step, process_index=jax.process_index(),
      process_count=jax.process_count(), scale_range=tuple(data.scale_range),
      flip=data.flip, mean=tuple(data.mean), std=tuple(data.std),
      num_parallel_calls=data.num_parallel_calls)
  return ds.as_numpy_iterator()


# -- evaluation ---------------------------------------------------------------
def eval_stream(config, records):
  """This process's eval batches of ``records`` (whole images, padded)."""
  data = config.data
  pad = int(data.eval_pad_size)
  return pipeline.eval_dataset(
      records, num_classes=data.num_classes,
      global_batch_size=data.eval_batch_size, pad_to=(pad, pad),
      process_index=jax.process_index(), process_count=jax.process_count(),
      mean=tuple(data.mean), std=tuple(data.std))


def evaluate(config, dp: parallel.DataParallel, p_eval, dstate, records,
             *, step: int, workdir: Optional[str] = None, writer=None
             ) -> Dict[str, Any]:
  """Runs the eval split; returns scores and writes prediction pictures.

  Args:
    config: run config.
    dp: the DataParallel in use.
    p_eval: the mapped ``eval_step``.
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
  ds = eval_stream(config, records)
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
  scores = metrics_lib.segmentation_scores(cm, class_names(config))
  scores['confusion'] = cm
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


def _scalar_scores(scores) -> Dict[str, float]:
  out = {'eval/miou': scores['miou'],
         'eval/pixel_accuracy': scores['pixel_accuracy'],
         'eval/mean_accuracy': scores['mean_accuracy']}
  out.update({f'eval_iou/{k}': v for k, v in scores['per_class'].items()
              if v == v})
  if 'no_crf' in scores:
    out['eval/miou_no_crf'] = scores['no_crf']['miou']
    out['eval/pixel_accuracy_no_crf'] = scores['no_crf']['pixel_accuracy']
  return out


def _eval_summary(scores) -> str:
  """One log line: mIoU, and the network's own when the CRF is on."""
  text = f'mIoU {scores["miou"]:.4f}'
  if 'no_crf' in scores:
    text += f' with the dense CRF ({scores["no_crf"]["miou"]:.4f} without)'
  return text


def _map_steps(config, dp):
  p_train = dp.map(
      functools.partial(step_lib.train_step, seed=config.seed,
                        aux_loss_weight=config.train.aux_loss_weight,
                        scale_loss_weight=config.train.scale_loss_weight,
                        normalize_loss=config.train.normalize_loss),
      (parallel.REPLICATED, parallel.REPLICATED), donate_state=True)
  crf = crf_settings(config)
  out_kinds = {'confusion': parallel.REPLICATED,
               'prediction': parallel.SHARDED}
  if crf is not None:
    out_kinds['confusion_no_crf'] = parallel.REPLICATED
  p_eval = dp.map(
      functools.partial(step_lib.eval_step,
                        num_classes=config.data.num_classes, crf=crf,
                        mean=tuple(config.data.mean),
                        std=tuple(config.data.std)),
      out_kinds)
  return p_train, p_eval


# -- entry points ---------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                       ) -> Dict[str, Any]:
  """Trains (resuming from ``workdir`` if it has checkpoints) and evaluates.

  Args:
    config: a full run config (see ``flaxseg.config.default_config``).
    workdir: directory for checkpoints, logs and pictures.

  Returns:
    ``{'step': final step, 'scores': last eval scores or None,
    'train_loss': last logged training loss}``.
  """
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  root = dataset_root(config, workdir)
  train_records = voc.list_records(root, config.data.train_split,
                                   sbd_root=config.data.sbd_root or None)
  eval_records = voc.list_records(root, config.data.eval_split)

  dp = parallel.DataParallel(config.parallel)
  if config.data.batch_size % dp.num_devices:
    raise ValueError(f'config.data.batch_size={config.data.batch_size} is not '
                     f'a multiple of the {dp.num_devices} devices')
  if config.data.eval_batch_size % dp.num_devices:
    raise ValueError(f'config.data.eval_batch_size='
                     f'{config.data.eval_batch_size} is not a multiple of the '
                     f'{dp.num_devices} devices')
  model = build_model(config)
  state = initial_state(config, model)
  ckpts = Checkpoints(os.path.join(workdir, 'checkpoints'),
                      max_to_keep=config.checkpoint.max_to_keep,
                      async_save=config.checkpoint.async_save)
  if ckpts.latest_step() is not None:
    state = restore_latest(ckpts, state, config)
    _log(f'resumed from {ckpts.directory} at step {int(state.step)}')
  else:
    state = warm_start.warm_start(config, state, _log)
  start = int(state.step)
  total = int(config.train.num_steps)
  schedule = optim.learning_rate_schedule(config.optim, total)
  meta = run_meta(config)

  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=False)
  if start == 0:
    writer.write_hparams({k: str(v) for k, v in
                          _flatten(config.to_dict()).items()})
  p_train, p_eval = _map_steps(config, dp)
  dstate = dp.put_state(state)
  del state
  batches = dp.prefetch(_train_stream(config, train_records, start),
                        config.data.prefetch_to_device)

  def save(step, pending):
    _check_finite(pending, step)
    ckpts.save(step, dp.get_state(dstate).checkpoint_tree(),
               dict(meta, step=step))

  pending, scores, last_loss = [], None, float('nan')
  t0, t_step0 = time.time(), start
  _log(f'training {config.model.name} for {total} steps from step {start} on '
       f'{dp.num_devices} device(s) ({config.parallel}), global batch '
       f'{config.data.batch_size}, crop {config.data.crop_size}')
  for step in range(start + 1, total + 1):
    dstate, m = p_train(dstate, next(batches))
    pending.append(m)
    if step % config.train.log_every_steps == 0 or step == total:
      summary = _check_finite(pending, step)
      pending = []
      now = time.time()
      rate = (step - t_step0) / max(now - t0, 1e-9)
      t0, t_step0 = now, step
      summary['lr'] = float(schedule(step - 1))
      summary['images_per_sec'] = rate * config.data.batch_size
      last_loss = summary['loss']
      writer.write_scalars(step, {f'train/{k}': v for k, v in summary.items()})
      eta = (total - step) / max(rate, 1e-9)
      _log(f'step {step}/{total}  loss {summary["loss"]:.4f}  '
           f'lr {summary["lr"]:.5f}  {summary["images_per_sec"]:.1f} img/s  '
           f'ETA {eta / 60:.1f} min')
    if step % config.checkpoint.every_steps == 0 and step != total:
      save(step, pending)
    if (config.eval.every_steps and step % config.eval.every_steps == 0
        and step != total):
      scores = evaluate(config, dp, p_eval, dstate, eval_records, step=step,
                        workdir=workdir, writer=writer)
      writer.write_scalars(step, _scalar_scores(scores))
      _log(f'eval at step {step}: {_eval_summary(scores)}')
  if total > start:
    save(total, pending)
  scores = evaluate(config, dp, p_eval, dstate, eval_records, step=total,
                    workdir=workdir, writer=writer)
  writer.write_scalars(total, _scalar_scores(scores))
  _log_scores(scores)
  _write_json(workdir, total, scores)
  ckpts.wait()
  ckpts.close()
  writer.flush()
  return {'step': total, 'scores': scores, 'train_loss': last_loss}


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        step: Optional[int] = None) -> Dict[str, Any]:
  """Evaluates the latest (or given) checkpoint of ``workdir`` on the eval split.

  Prints the per-class IoU table and writes ``WORKDIR/eval_STEP.json``
  (with ``config.eval.crf.enabled``: the CRF's scores, and the network's own
  under ``no_crf``).
  """
  validate_config(config)
  root = dataset_root(config, workdir)
  eval_records = voc.list_records(root, config.data.eval_split)
  dp = parallel.DataParallel(config.parallel)
  state = restore_for_eval(config, workdir, step)
  _, p_eval = _map_steps(config, dp)
  scores = evaluate(config, dp, p_eval, dp.put_state(state), eval_records,
                    step=int(state.step), workdir=workdir)
  _log_scores(scores)
  _write_json(workdir, int(state.step), scores)
  return scores


# -- helpers -------------------------------------------------------------------
def _check_finite(pending, step: int) -> Dict[str, float]:
  """Means of the pending step metrics; raises on a non-finite step."""
  if not pending:
    return {}
  host = jax.device_get(pending)
  host = [{k: float(np.asarray(v).reshape(-1)[0]) for k, v in m.items()}
          for m in host]
  for offset, m in enumerate(host):
    if m['finite'] < 1.0:
      bad = step - len(host) + offset + 1
      raise FloatingPointError(
          f'non-finite loss or gradient at step {bad} (loss={m["loss"]}, '
          f'grad_norm={m["grad_norm"]}); no checkpoint was written for it')
  return {k: float(np.mean([m[k] for m in host])) for k in host[0]
          if k != 'finite'}


def _log_scores(scores) -> None:
  if 'no_crf' in scores:
    _log('without the dense CRF:\n' +
         metrics_lib.format_iou_table(scores['no_crf']))
    _log(f'with the dense CRF ({scores["crf"]}):')
  _log(metrics_lib.format_iou_table(scores))
  if 'no_crf' in scores:
    _log(_eval_summary(scores))


def _json_scores(scores) -> Dict[str, Any]:
  out = {k: v for k, v in scores.items() if k in (
      'miou', 'pixel_accuracy', 'mean_accuracy', 'per_class')}
  out['confusion'] = np.asarray(scores['confusion']).tolist()
  return out


def _write_json(workdir: str, step: int, scores) -> None:
  if jax.process_index() != 0:
    return
  out = _json_scores(scores)
  if 'no_crf' in scores:
    out['crf'] = scores['crf']
    out['no_crf'] = _json_scores(scores['no_crf'])
  out['step'] = step
  path = os.path.join(workdir, f'eval_{step}.json')
  with open(path + '.tmp', 'w') as f:
    json.dump(out, f, indent=1, allow_nan=True)
  os.replace(path + '.tmp', path)


def _flatten(d, prefix=''):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out
