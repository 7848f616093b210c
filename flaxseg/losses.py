"""Segmentation losses.

The per-pixel softmax cross-entropy comes from optax; what this module adds is
the bookkeeping segmentation needs: pixels labelled ``ignore_index`` (255 in
PASCAL VOC, the void band around objects) contribute neither to the loss nor to
its normaliser, and the normaliser can be a count summed over a data-parallel
axis so that a sharded step computes exactly the loss of the global batch.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from flaxseg import collectives

IGNORE_INDEX = 255


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array,
                        ignore_index: int = IGNORE_INDEX):
  """Per-pixel softmax cross-entropy with ignored pixels zeroed.

  Args:
    logits: ``[..., H, W, C]`` class scores (any float dtype; computed in f32).
    labels: ``[..., H, W]`` integer class ids; ``ignore_index`` marks void.
    ignore_index: label value that is excluded.

  Returns:
    ``(loss, valid)``: float32 per-pixel losses (0 where ignored) and the
    float32 mask of pixels that count.
  """
  valid = labels != ignore_index
  safe_labels = jnp.where(valid, labels, 0).astype(jnp.int32)
  # float32 at least (bf16 logits); float64 stays (numerical checks).
  dtype = jnp.promote_types(logits.dtype, jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(dtype), safe_labels)
  valid = valid.astype(dtype)
  return loss * valid, valid


def segmentation_loss(logits: jax.Array, labels: jax.Array, *,
                      ignore_index: int = IGNORE_INDEX,
                      axis_name: Optional[str] = None,
                      normalize: bool = True) -> jax.Array:
  """Cross-entropy averaged over the valid pixels of the (global) batch.

  With ``axis_name`` set, the valid-pixel count is summed over that axis, so the
  returned value is this shard's share of the global mean: summing it (and its
  gradient) over the axis gives exactly the loss of the whole batch, whatever
  the number of shards. The count does not depend on the parameters, so the
  gradient is unaffected by the ``psum``.

  Args:
    logits: ``[B, H, W, C]`` class scores.
    labels: ``[B, H, W]`` integer labels.
    ignore_index: void label.
    axis_name: data-parallel axis to normalise over, or ``None``.
    normalize: if False, return the plain sum (FCN's unnormalised loss,
      Long et al. 2015 sec. 4.3).

  Returns:
    A float32 scalar.
  """
  loss, valid = pixel_cross_entropy(logits, labels, ignore_index)
  total = jnp.sum(loss)
  if not normalize:
    return total
  count = jnp.sum(valid)
  if axis_name is not None:
    count = collectives.psum(count, axis_name)
  return total / jnp.maximum(count, 1.0)
