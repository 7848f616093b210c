"""The training loop: ``train_and_evaluate``.

One run = data (VOC reader + tf.data), model from the registry, optax
optimizer, the per-shard steps mapped by ``DataParallel``, Orbax checkpoints in
``WORKDIR/checkpoints`` (resumed automatically from the latest), periodic
evaluation by ``flaxseg.train.evaluator`` (streaming confusion matrix ->
mIoU under ``config.eval``'s inference mode, after dense-CRF post-processing
when ``config.eval.crf.enabled``, with the network's own mIoU reported beside
it), logs on stdout and in TensorBoard (``WORKDIR``), prediction pictures in
``WORKDIR/predictions``, the run's config in ``WORKDIR/config.json``.

Resuming is exact: the state is restored bit for bit, the data stream restarts
at the restored step (it is a pure function of seed and step), and dropout keys
are derived from the step.

Preemption: SIGTERM or SIGINT during training (a preemptible VM going away,
Ctrl-C) finishes the step in flight, saves a checkpoint at that step, and
returns with ``'preempted'`` set to the signal's name; running the same
command again resumes from there. A second signal while that checkpoint is
written is left to its default action (kill), so a stuck save can still be
interrupted.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
import time
from typing import Any, Dict

import jax
import ml_collections
import numpy as np
from clu import metric_writers
from jax.experimental import multihost_utils

from flaxseg.checkpoint import Checkpoints
from flaxseg.config import validate_config
from flaxseg.data import pipeline, voc
from flaxseg.train import distributed, evaluator, optim, parallel
from flaxseg.train import step as step_lib, warm_start
# The builders and the eval entry point, importable from here as before.
from flaxseg.train.builders import (build_model, class_names,  # noqa: F401
                                    dataset_root, ensure_synthetic,
                                    initial_state, log, log_every_process,
                                    restore_latest,
                                    run_meta, save_run_config)
from flaxseg.train.evaluator import (crf_settings, eval_stream,  # noqa: F401
                                     evaluate_checkpoint, restore_for_eval)


# -- training ------------------------------------------------------------------
#: ``config.train.on_nonfinite`` values.
NONFINITE_MODES = ('raise', 'skip')

#: Signals that make the trainer checkpoint and return.
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def _preemption_flag():
  """Yields a dict whose ``'signal'`` is set when a preemption signal comes.

  The handlers are installed only in the main thread (Python delivers signals
  there; elsewhere the trainer runs without them) and restored on exit. After
  the first signal the default action is back, so a second one kills.
  """
  flag = {'signal': None}
  if (threading.current_thread() is not threading.main_thread()
      or jax.process_count() > 1):
    # Several processes: SIGTERM goes to JAX's preemption notifier instead,
    # which agrees on one step for all of them (see _preempted).
    yield flag
    return
  previous = {s: signal.getsignal(s) for s in PREEMPTION_SIGNALS}

  def handler(signum, frame):
    del frame
    flag['signal'] = signal.Signals(signum).name
    for s in PREEMPTION_SIGNALS:
      signal.signal(s, signal.SIG_DFL)

  for s in PREEMPTION_SIGNALS:
    signal.signal(s, handler)
  try:
    yield flag
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


@contextlib.contextmanager
def _saves_finished_on_error(ckpts):
  """On an exception, lets checkpoint writes in flight (good ones: each was
  checked before it started) finish before the error propagates, so a
  crash or NaN never costs the checkpoint being written."""
  try:
    yield
  except BaseException:
    try:
      ckpts.wait()
      ckpts.close()
    except Exception:  # pylint: disable=broad-except
      pass   # the original error matters more
    raise


def _preempted(stop, step: int):
  """The signal's name if training must checkpoint and stop after ``step``.

  One process: the flag our handler sets. Several: JAX's preemption sync
  point (``multihost_utils.reached_preemption_sync_point``), which is
  reached on every process at the same step once any of them got SIGTERM.
  """
  if jax.process_count() > 1:
    return 'SIGTERM' if multihost_utils.reached_preemption_sync_point(
        step) else None
  return stop['signal']


def _train_stream(config, records, start_step: int, bad_examples=None):
  data = config.data
  ds = pipeline.train_dataset(
      records, num_classes=data.num_classes,
      global_batch_size=data.batch_size,
      crop_size=(data.crop_size, data.crop_size), seed=config.seed,
      start_step=start_step, process_index=jax.process_index(),
      process_count=jax.process_count(), scale_range=tuple(data.scale_range),
      flip=data.flip, mean=tuple(data.mean), std=tuple(data.std),
      num_parallel_calls=data.num_parallel_calls,
      on_bad_example=data.on_bad_example, bad_examples=bad_examples)
  return ds.as_numpy_iterator()


def _map_train_step(config, dp):
  return dp.map(
      functools.partial(step_lib.train_step, seed=config.seed,
                        aux_loss_weight=config.train.aux_loss_weight,
                        scale_loss_weight=config.train.scale_loss_weight,
                        normalize_loss=config.train.normalize_loss,
                        skip_nonfinite=config.train.on_nonfinite == 'skip'),
      (parallel.REPLICATED, parallel.REPLICATED), donate_state=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                       ) -> Dict[str, Any]:
  """Trains (resuming from ``workdir`` if it has checkpoints) and evaluates.

  Args:
    config: a full run config (see ``flaxseg.config.default_config``).
    workdir: directory for checkpoints, logs and pictures.

  Returns:
    ``{'step': final step, 'scores': last eval scores or None,
    'train_loss': last logged training loss, 'preempted': None}``; after a
    SIGTERM/SIGINT, ``'step'`` is the step checkpointed, ``'scores'`` None
    and ``'preempted'`` the signal's name (``'SIGTERM'``).
  """
  validate_config(config)
  if config.train.on_nonfinite not in NONFINITE_MODES:
    raise ValueError(f'config.train.on_nonfinite={config.train.on_nonfinite!r}'
                     f': expected one of {NONFINITE_MODES}')
  distributed.initialize(config.distributed)
  with _preemption_flag() as stop:
    return _train_and_evaluate(config, workdir, stop)


def _train_and_evaluate(config, workdir, stop):
  os.makedirs(workdir, exist_ok=True)
  save_run_config(config, workdir)
  root = dataset_root(config, workdir)
  train_records = voc.list_records(root, config.data.train_split,
                                   sbd_root=config.data.sbd_root or None)
  eval_records = voc.list_records(root, config.data.eval_split)

  dp = parallel.DataParallel(config.parallel,
                             reduction=config.train.reduction)
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
  with _saves_finished_on_error(ckpts):
    if ckpts.latest_step() is not None:
      state = restore_latest(ckpts, state, config)
      log(f'resumed from {ckpts.directory} at step {int(state.step)}')
    else:
      state = warm_start.warm_start(config, state, log)
    start = int(state.step)
    total = int(config.train.num_steps)
    schedule = optim.learning_rate_schedule(config.optim, total)
    meta = run_meta(config)

    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0, asynchronous=False)
    if start == 0:
      writer.write_hparams({k: str(v) for k, v in
                            _flatten(config.to_dict()).items()})
    p_train = _map_train_step(config, dp)
    p_eval = evaluator.map_eval_step(config, dp)
    dstate = dp.put_state(state)
    del state
    bad_examples = pipeline.BadExamples()
    batches = dp.prefetch(_train_stream(config, train_records, start,
                                        bad_examples),
                          config.data.prefetch_to_device)

    skips = _Skips(config.train)

    def save(step, pending):
      skips.check(pending, step)
      ckpts.save(step, dp.get_state(dstate).checkpoint_tree(),
                 dict(meta, step=step))

    pending, scores, last_loss = [], None, float('nan')
    t0, t_step0 = time.time(), start
    log(f'training {config.model.name} for {total} steps from step {start} on '
        f'{dp.num_devices} device(s) ({config.parallel}), global batch '
        f'{config.data.batch_size}, crop {config.data.crop_size}')
    for step in range(start + 1, total + 1):
      dstate, m = p_train(dstate, next(batches))
      pending.append(m)
      signalled = _preempted(stop, step)
      if signalled is not None:
        save(step, pending)
        ckpts.wait()
        ckpts.close()
        writer.flush()
        log(f'{signalled} at step {step}: checkpoint saved in '
            f'{ckpts.directory}; run the same command again to resume')
        return {'step': step, 'scores': None, 'train_loss': last_loss,
                'preempted': signalled, 'skipped_steps': skips.steps,
                'skipped_examples': sorted(bad_examples.errors)}
      if step % config.train.log_every_steps == 0 or step == total:
        summary = skips.check(pending, step)
        pending = []
        now = time.time()
        rate = (step - t_step0) / max(now - t0, 1e-9)
        t0, t_step0 = now, step
        summary['lr'] = float(schedule(step - 1))
        summary['images_per_sec'] = rate * config.data.batch_size
        for message in bad_examples.take_new():
          log_every_process(f'skipped a training example: {message}')
        if config.data.on_bad_example == 'skip':
          summary['skipped_examples'] = float(len(bad_examples))
        last_loss = summary['loss']
        writer.write_scalars(step, {f'train/{k}': v
                                    for k, v in summary.items()})
        eta = (total - step) / max(rate, 1e-9)
        log(f'step {step}/{total}  loss {summary["loss"]:.4f}  '
            f'lr {summary["lr"]:.5f}  {summary["images_per_sec"]:.1f} img/s  '
            f'ETA {eta / 60:.1f} min' + skips.note())
      if step % config.checkpoint.every_steps == 0 and step != total:
        save(step, pending)
      if (config.eval.every_steps and step % config.eval.every_steps == 0
          and step != total):
        scores = evaluator.evaluate(config, dp, p_eval, dstate, eval_records,
                                    step=step, workdir=workdir, writer=writer)
        writer.write_scalars(step, evaluator.scalar_scores(scores))
        log(f'eval at step {step}: {evaluator.eval_summary(scores)}')
    if total > start:
      save(total, pending)
    scores = evaluator.evaluate(config, dp, p_eval, dstate, eval_records,
                                step=total, workdir=workdir, writer=writer)
    writer.write_scalars(total, evaluator.scalar_scores(scores))
    evaluator.log_scores(scores)
    evaluator.write_report(workdir, total, scores, config)
    ckpts.wait()
    ckpts.close()
    writer.flush()
    return {'step': total, 'scores': scores, 'train_loss': last_loss,
            'preempted': None, 'skipped_steps': skips.steps,
            'skipped_examples': sorted(bad_examples.errors)}


# -- helpers -------------------------------------------------------------------
class _Skips:
  """Non-finite steps of the run: raises on one, or counts skipped ones.

  ``check(pending, step)`` reduces the step metrics pending since the last
  log (ending at ``step``; a checkpoint checks them too, so a step can be
  seen twice) to their means over the finite steps. With
  ``on_nonfinite='raise'`` a non-finite step raises ``FloatingPointError``
  naming it; callers check before every checkpoint, so none is written
  after a bad step. With ``'skip'`` the step has already left the state as
  it was (``train_step(skip_nonfinite=True)``); it is counted, named in the
  logs, and more than ``max_nonfinite_skips`` of them raise.
  """

  def __init__(self, train_config):
    self.skip = train_config.on_nonfinite == 'skip'
    self.limit = int(train_config.max_nonfinite_skips)
    self.steps = []        # steps whose update was skipped
    self._new = []

  def check(self, pending, step: int) -> Dict[str, float]:
    if not pending:
      return {}
    # Replicated metrics: one local shard each (no cross-process step).
    host = [{k: float(parallel.host_local(v).reshape(-1)[0])
             for k, v in m.items()} for m in pending]
    good = []
    for offset, m in enumerate(host):
      if m['finite'] >= 1.0:
        good.append(m)
        continue
      bad = step - len(host) + offset + 1
      if not self.skip:
        raise FloatingPointError(
            f'non-finite loss or gradient at step {bad} (loss={m["loss"]}, '
            f'grad_norm={m["grad_norm"]}); no checkpoint was written for it '
            "(config.train.on_nonfinite='skip' skips such updates)")
      if bad in self.steps:   # checked before (a save, then the log)
        continue
      self.steps.append(bad)
      self._new.append(bad)
      if len(self.steps) > self.limit:
        raise FloatingPointError(
            f'{len(self.steps)} non-finite steps (the last at step {bad}) '
            f'exceed config.train.max_nonfinite_skips={self.limit}; skipped '
            f'steps: {self.steps[:20]}')
    out = {k: float(np.mean([m[k] for m in good])) if good else float('nan')
           for k in host[0] if k != 'finite'}
    out['skipped_updates'] = float(len(self.steps))
    return out

  def note(self) -> str:
    """Log suffix naming the steps skipped since the last note."""
    if not self._new:
      return ''
    new, self._new = self._new, []
    return (f'  (skipped non-finite update(s) at step(s) '
            f'{", ".join(map(str, new))}; {len(self.steps)} so far)')


def _flatten(d, prefix=''):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out
