"""Pure train and eval steps, written per shard.

Each function sees one shard of the global batch and an ``axis_name`` naming
the data-parallel axis (``None`` on a single device). The loss is normalised by
the valid-pixel count of the *global* batch and gradients are summed over the
axis, so any number of shards computes the update of the whole batch. The
functions are mapped by ``flaxseg.train.parallel`` with ``jax.pmap`` or
``jax.jit(jax.shard_map(...))``.

Evaluation can refine the logits with the dense CRF (DeepLab v1/v2's
post-processing, ``config.eval.crf``) before the argmax: :func:`crf_refine`
runs it on each image's unpadded region only, so padding never changes a
prediction.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from flaxseg import collectives, inference, losses, metrics
from flaxseg.config import IMAGENET_MEAN, IMAGENET_STD
from flaxseg.inference import crf_refine, image_mask
from flaxseg.train.state import TrainState


def _psum(x, axis_name):
  # jax.lax.psum, or the device-ordered sum for config.train.reduction=
  # 'ordered' (axis_name is then a collectives.OrderedAxis).
  return collectives.psum(x, axis_name)


def step_rng(seed: int, step, axis_name: Optional[str]):
  """The dropout key of a step: a function of (seed, step, shard) only.

  Deriving it from the step (not from a key carried in the state) is what makes
  a resumed run draw the same randomness as an uninterrupted one.
  """
  rng = jax.random.fold_in(jax.random.key(seed), step)
  if axis_name is not None:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
  return rng


def train_step(state: TrainState, batch: Dict[str, jax.Array], *,
               axis_name: Optional[str], seed: int = 0,
               aux_loss_weight: float = 0.0,
               scale_loss_weight: float = 0.0,
               ignore_index: int = losses.IGNORE_INDEX,
               normalize_loss: bool = True,
               skip_nonfinite: bool = False
               ) -> tuple[TrainState, Dict[str, jax.Array]]:
  """One SGD step on a shard of the batch.

  Args:
    state: the (replicated) training state.
    batch: ``image`` float ``[b, H, W, 3]`` and ``label`` int ``[b, H, W]``.
    axis_name: data-parallel axis, or ``None``.
    seed: base seed for dropout keys.
    aux_loss_weight: weight of the auxiliary head's loss (torchvision: 0.5),
      used when the model returns ``aux['aux_logits']``.
    scale_loss_weight: weight of the loss on each input scale's own logits,
      used when the model returns ``aux['scale_logits']`` (DeepLab v2's
      multi-scale training, sec. 4.1, puts weight 1 on each).
    ignore_index: void label.
    normalize_loss: mean over valid pixels (True) or plain sum.
    skip_nonfinite: when the loss or the gradient is not finite, return the
      state unchanged except for ``step`` (parameters, BatchNorm statistics
      and optimizer state, its step count included, are kept), so the run
      continues on the next batch (``config.train.on_nonfinite='skip'``).

  Returns:
    ``(new_state, metrics)`` with scalar ``loss``, ``main_loss``, ``aux_loss``,
    ``grad_norm`` and ``finite`` (1.0 when loss and gradients are finite),
    identical on every shard.
  """
  rng = step_rng(seed, state.step, axis_name)

  def loss_fn(params):
    (logits, aux), new_vars = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'],
        train=True, mutable=['batch_stats'], rngs={'dropout': rng})
    kwargs = dict(ignore_index=ignore_index, axis_name=axis_name,
                  normalize=normalize_loss)
    main = losses.segmentation_loss(logits, batch['label'], **kwargs)
    aux_loss = jnp.zeros((), jnp.float32)
    if aux_loss_weight and 'aux_logits' in aux:
      aux_loss = losses.segmentation_loss(aux['aux_logits'], batch['label'],
                                          **kwargs)
    total = main + aux_loss_weight * aux_loss
    if scale_loss_weight and 'scale_logits' in aux:
      total += scale_loss_weight * sum(
          losses.segmentation_loss(s, batch['label'], **kwargs)
          for s in aux['scale_logits'])
    return total, (new_vars.get('batch_stats', state.batch_stats), main,
                   aux_loss)

  (loss, (batch_stats, main, aux_loss)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  grads = _psum(grads, axis_name)
  loss, main, aux_loss = (_psum(v, axis_name) for v in (loss, main, aux_loss))
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = state.apply_gradients(grads, batch_stats)
  if skip_nonfinite:
    kept = state.replace(step=new_state.step)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                             new_state, kept)
  return new_state, {'loss': loss, 'main_loss': main, 'aux_loss': aux_loss,
                     'grad_norm': grad_norm,
                     'finite': finite.astype(jnp.float32)}


def predict_logits(state: TrainState, images: jax.Array) -> jax.Array:
  """Inference-mode logits at input resolution."""
  logits, _ = state.apply_fn(state.variables, images, train=False)
  return logits


def score_logits(logits, batch: Dict[str, jax.Array], *,
                 axis_name: Optional[str], num_classes: int,
                 ignore_index: int = losses.IGNORE_INDEX,
                 crf: Optional[Mapping[str, Any]] = None,
                 mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> Dict[str, jax.Array]:
  """Predictions and confusion matrices of a batch's logits.

  Args:
    logits: ``[b, H, W, L]`` logits at the batch's (padded) resolution.
    batch: ``label`` (255 in padding), optional ``valid`` ``[b]`` flags and,
      with ``crf``, ``image`` and (for padded batches) ``height``/``width``.
    axis_name: data-parallel axis, or ``None``.
    num_classes: number of classes.
    ignore_index: void label.
    crf: CRF settings (:func:`crf_refine`), or ``None`` for the plain argmax.
    mean, std: the normalisation of ``batch['image']`` (for the CRF).

  Returns:
    ``confusion`` int32 ``[C, C]`` summed over the axis and this shard's
    ``prediction`` int32 ``[b, H, W]`` (both after the CRF when it is on);
    with ``crf``, also ``confusion_no_crf``, the network's own.
  """
  valid = batch.get('valid')
  weights = None if valid is None else valid[:, None, None]

  def confusion(prediction):
    cm = metrics.confusion_matrix(prediction, batch['label'], num_classes,
                                  ignore_index, weights)
    return _psum(cm, axis_name)

  prediction = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if crf is None:
    return {'confusion': confusion(prediction), 'prediction': prediction}
  mask = None
  if 'height' in batch and 'width' in batch:
    mask = image_mask(batch['height'], batch['width'], logits.shape[1:3])
  q = crf_refine(logits, batch['image'], mask, crf, mean=mean, std=std)
  refined = jnp.argmax(q, axis=-1).astype(jnp.int32)
  return {'confusion': confusion(refined), 'prediction': refined,
          'confusion_no_crf': confusion(prediction)}


def eval_step(state: TrainState, batch: Dict[str, jax.Array], *,
              axis_name: Optional[str], num_classes: int,
              ignore_index: int = losses.IGNORE_INDEX,
              crf: Optional[Mapping[str, Any]] = None,
              mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD,
              settings: inference.Settings = inference.Settings(),
              apply_fn=None) -> Dict[str, jax.Array]:
  """Confusion matrix (summed over shards) and predictions of an eval batch.

  Args:
    state: the training state.
    batch: ``image``, ``label`` (255 in padding), ``valid`` ``[b]`` flags and,
      for the CRF on padded images, ``height``/``width`` ``[b]``.
    axis_name: data-parallel axis, or ``None``.
    num_classes: number of classes.
    ignore_index: void label.
    crf: dense-CRF settings (the keys of ``inference.CRF_KEYS``) to refine
      the logits before the argmax (DeepLab v1/v2), or ``None``.
    mean, std: the normalisation of ``batch['image']`` (for the CRF).
    settings: the inference mode (scales, flip, sliding window).
    apply_fn: the evaluation model's ``apply`` when it differs from the
      training one (another output stride), else ``None``.

  Returns:
    ``confusion`` int32 ``[C, C]`` summed over the axis, and this shard's
    ``prediction`` int32 ``[b, H, W]``; with ``crf``, both are the CRF's and
    ``confusion_no_crf`` is the network's own.
  """
  logits = inference.segment_logits(apply_fn or state.apply_fn,
                                    state.variables, batch['image'], settings)
  return score_logits(logits, batch, axis_name=axis_name,
                      num_classes=num_classes, ignore_index=ignore_index,
                      crf=crf, mean=mean, std=std)


def predict_step(state: TrainState, batch: Dict[str, jax.Array], *,
                 axis_name: Optional[str] = None,
                 crf: Optional[Mapping[str, Any]] = None,
                 mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD,
                 settings: inference.Settings = inference.Settings(),
                 apply_fn=None, probabilities: bool = False
                 ) -> Dict[str, jax.Array]:
  """Label maps (and optionally class probabilities) of a batch of images.

  The same computation as :func:`eval_step` (same inference mode, same CRF
  on each image's unpadded region), without labels.

  Args:
    state: the training state (only ``params``/``batch_stats`` are used).
    batch: ``image`` ``[b, H, W, 3]`` normalised and padded, ``height`` and
      ``width`` ``[b]`` (each image's size; 0 for filler rows).
    axis_name: unused (the step has no collective); kept for mapping.
    crf, mean, std, settings, apply_fn: as in :func:`eval_step`.
    probabilities: also return the per-class probabilities.

  Returns:
    ``prediction`` int32 ``[b, H, W]``, and with ``probabilities``,
    ``probabilities`` float32 ``[b, H, W, L]`` (the CRF's marginals when it
    is on, else the softmax of the logits).
  """
  del axis_name
  logits = inference.segment_logits(apply_fn or state.apply_fn,
                                    state.variables, batch['image'], settings)
  if crf is not None:
    mask = image_mask(batch['height'], batch['width'], logits.shape[1:3])
    probs = crf_refine(logits, batch['image'], mask, crf, mean=mean, std=std)
  else:
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  out = {'prediction': jnp.argmax(probs if crf is not None else logits,
                                  axis=-1).astype(jnp.int32)}
  if probabilities:
    out['probabilities'] = probs.astype(jnp.float32)
  return out
