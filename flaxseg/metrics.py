"""Segmentation metrics from a streaming confusion matrix.

The confusion matrix is accumulated on device (``confusion_matrix``, summed
over data-parallel shards by the caller) and reduced on the host
(``segmentation_scores``) into the PASCAL VOC measures: per-class IoU
(TP / (TP + FP + FN)), their mean over classes that occur (mIoU), pixel
accuracy and mean class accuracy. Pixels labelled 255 are ignored throughout.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_INDEX = 255


def confusion_matrix(predictions: jax.Array, labels: jax.Array,
                     num_classes: int, ignore_index: int = IGNORE_INDEX,
                     weights: Optional[jax.Array] = None) -> jax.Array:
  """Confusion matrix ``cm[true, predicted]`` of one batch, on device.

  Args:
    predictions: integer class ids, any shape.
    labels: integer ground truth, same shape; ``ignore_index`` is skipped, as
      is any value outside ``[0, num_classes)``.
    num_classes: number of classes ``C``.
    ignore_index: void label.
    weights: optional 0/1 mask broadcastable to ``labels`` (e.g. to drop
      padding examples).

  Returns:
    ``int32 [C, C]`` counts.
  """
  labels = labels.astype(jnp.int32)
  predictions = predictions.astype(jnp.int32)
  valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
  if weights is not None:
    valid = valid & (jnp.broadcast_to(weights, labels.shape) > 0)
  index = jnp.where(valid, labels * num_classes + predictions, 0)
  counts = jnp.bincount(index.reshape(-1), weights=valid.reshape(-1).astype(
      jnp.int32), length=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes).astype(jnp.int32)


def segmentation_scores(cm, class_names: Optional[Sequence[str]] = None
                        ) -> Dict[str, object]:
  """Scores from a confusion matrix (host side, numpy).

  Classes with no ground-truth and no predicted pixel have an undefined IoU
  (NaN) and are left out of the mean, as in the VOC devkit and mmseg.

  Args:
    cm: ``[C, C]`` confusion matrix, rows = ground truth.
    class_names: optional names for the per-class dict.

  Returns:
    dict with ``miou``, ``pixel_accuracy``, ``mean_accuracy`` (floats),
    ``iou`` (numpy ``[C]``) and ``per_class`` (name -> IoU).
  """
  cm = np.asarray(cm, dtype=np.float64)
  tp = np.diag(cm)
  gt = cm.sum(axis=1)
  pred = cm.sum(axis=0)
  union = gt + pred - tp
  with np.errstate(invalid='ignore', divide='ignore'):
    iou = np.where(union > 0, tp / union, np.nan)
    acc = np.where(gt > 0, tp / gt, np.nan)
  total = cm.sum()
  names = list(class_names) if class_names is not None else [
      str(i) for i in range(len(tp))]
  finite = ~np.isnan(iou)
  return {
      'miou': float(np.mean(iou[finite])) if finite.any() else float('nan'),
      'pixel_accuracy': float(tp.sum() / total) if total > 0 else float('nan'),
      'mean_accuracy': (float(np.nanmean(acc)) if (~np.isnan(acc)).any()
                        else float('nan')),
      'iou': iou,
      'per_class': {n: float(v) for n, v in zip(names, iou)},
  }


def format_iou_table(scores: Dict[str, object]) -> str:
  """A plain-text per-class IoU table followed by the summary scores."""
  per_class = scores['per_class']
  width = max([len(n) for n in per_class] + [5])
  lines = [f'{"class":<{width}}  IoU']
  for name, value in per_class.items():
    lines.append(f'{name:<{width}}  {value * 100:6.2f}' if value == value
                 else f'{name:<{width}}     n/a')
  lines.append(f'{"mIoU":<{width}}  {scores["miou"] * 100:6.2f}')
  lines.append(f'{"pixel acc":<{width}}  {scores["pixel_accuracy"] * 100:6.2f}')
  return '\n'.join(lines)
