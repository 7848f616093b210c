"""Pure train and eval steps, written per shard.

Each function sees one shard of the global batch and an ``axis_name`` naming
the data-parallel axis (``None`` on a single device). The loss is normalised by
the valid-pixel count of the *global* batch and gradients are summed over the
axis, so any number of shards computes the update of the whole batch. The
functions are mapped by ``flaxseg.train.parallel`` with ``jax.pmap`` or
``jax.jit(jax.shard_map(...))``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import optax

from flaxseg import losses, metrics
from flaxseg.train.state import TrainState


def _psum(x, axis_name):
  return x if axis_name is None else jax.lax.psum(x, axis_name)


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
               normalize_loss: bool = True
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
  return new_state, {'loss': loss, 'main_loss': main, 'aux_loss': aux_loss,
                     'grad_norm': grad_norm,
                     'finite': finite.astype(jnp.float32)}


def predict_logits(state: TrainState, images: jax.Array) -> jax.Array:
  """Inference-mode logits at input resolution."""
  logits, _ = state.apply_fn(state.variables, images, train=False)
  return logits


def eval_step(state: TrainState, batch: Dict[str, jax.Array], *,
              axis_name: Optional[str], num_classes: int,
              ignore_index: int = losses.IGNORE_INDEX) -> Dict[str, jax.Array]:
  """Confusion matrix (summed over shards) and predictions of an eval batch.

  Args:
    state: the training state.
    batch: ``image``, ``label`` (255 in padding) and ``valid`` ``[b]`` flags.
    axis_name: data-parallel axis, or ``None``.
    num_classes: number of classes.
    ignore_index: void label.

  Returns:
    ``confusion`` int32 ``[C, C]`` summed over the axis, and this shard's
    ``prediction`` int32 ``[b, H, W]``.
  """
  logits = predict_logits(state, batch['image'])
  prediction = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  valid = batch.get('valid')
  weights = None if valid is None else valid[:, None, None]
  cm = metrics.confusion_matrix(prediction, batch['label'], num_classes,
                                ignore_index, weights)
  return {'confusion': _psum(cm, axis_name), 'prediction': prediction}
