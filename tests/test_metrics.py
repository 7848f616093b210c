"""Tests for flaxseg.metrics against plain numpy references."""

import jax.numpy as jnp
import numpy as np
import pytest

from flaxseg import metrics


def _np_confusion(pred, label, c):
  cm = np.zeros((c, c), np.int64)
  for p, t in zip(pred.reshape(-1), label.reshape(-1)):
    if t != 255:
      cm[t, p] += 1
  return cm


def _np_miou(pred, label, c):
  ious = []
  for k in range(c):
    valid = label != 255
    p, t = (pred == k) & valid, (label == k) & valid
    union = (p | t).sum()
    if union:
      ious.append((p & t).sum() / union)
  return float(np.mean(ious))


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_confusion_and_miou_match_numpy(seed):
  rng = np.random.default_rng(seed)
  c = 6
  label = rng.integers(0, c, size=(3, 17, 13))
  label[rng.random(label.shape) < 0.2] = 255
  label[label == 4] = 5  # class 4 absent from the ground truth
  pred = rng.integers(0, c, size=label.shape)
  pred[pred == 4] = 3    # ... and from the predictions: undefined, skipped
  cm = np.asarray(metrics.confusion_matrix(jnp.asarray(pred),
                                           jnp.asarray(label), c))
  np.testing.assert_array_equal(cm, _np_confusion(pred, label, c))
  scores = metrics.segmentation_scores(cm)
  assert np.isnan(scores['iou'][4])
  np.testing.assert_allclose(scores['miou'], _np_miou(pred, label, c),
                             rtol=1e-12)
  valid = label != 255
  np.testing.assert_allclose(scores['pixel_accuracy'],
                             (pred == label)[valid].mean())


def test_weights_drop_padding_examples():
  label = jnp.array([[[1, 1]], [[0, 1]]])
  pred = jnp.array([[[1, 0]], [[0, 0]]])
  cm = metrics.confusion_matrix(pred, label, 2,
                                weights=jnp.array([1, 0])[:, None, None])
  np.testing.assert_array_equal(cm, [[0, 0], [1, 1]])


def test_out_of_range_labels_are_ignored():
  cm = metrics.confusion_matrix(jnp.array([0, 1, 1]), jnp.array([0, 7, 255]),
                                2)
  assert int(cm.sum()) == 1


def test_table_lists_every_class():
  scores = metrics.segmentation_scores(np.array([[3, 1], [0, 2]]), ['bg', 'x'])
  table = metrics.format_iou_table(scores)
  assert 'bg' in table and 'x' in table and 'mIoU' in table
