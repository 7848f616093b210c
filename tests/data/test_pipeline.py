"""Tests for flaxseg.data.pipeline and flaxseg.data.transforms (tf.data, CPU)."""

import os

import numpy as np
import pytest
import tensorflow as tf

from flaxseg.data import pipeline
from flaxseg.data import synthetic
from flaxseg.data import transforms
from flaxseg.data import voc

NUM_CLASSES = synthetic.NUM_SYNTH_CLASSES
MEAN = np.array(transforms.IMAGENET_MEAN, np.float32)
STD = np.array(transforms.IMAGENET_STD, np.float32)
CROP = (48, 48)


@pytest.fixture(scope="module")
def train_records(voc_root):
  return voc.list_records(voc_root, "train")  # 8 records.


def _take(ds, n):
  return [{k: v.numpy() for k, v in b.items()} for b in ds.take(n)]


def _train(records, **kwargs):
  args = dict(num_classes=NUM_CLASSES, global_batch_size=4, crop_size=CROP,
              seed=0, num_parallel_calls=2)
  args.update(kwargs)
  return pipeline.train_dataset(records, **args)


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_train_shapes_and_dtypes(train_records):
  (batch,) = _take(_train(train_records), 1)
  assert batch["image"].shape == (4, *CROP, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (4, *CROP) and batch["label"].dtype == np.int32
  values = set(np.unique(batch["label"]).tolist())
  assert values <= set(range(NUM_CLASSES)) | {255}
  assert np.abs(batch["image"]).max() < 3.0  # Normalised.


def test_train_deterministic_and_seed_dependent(train_records):
  a = _take(_train(train_records), 3)
  b = _take(_train(train_records), 3)
  _assert_batches_equal(a, b)
  c = _take(_train(train_records, seed=1), 1)
  assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_resume_matches_and_skips_without_reading(train_records, monkeypatch):
  full = _take(_train(train_records), 5)
  positions = []
  call = pipeline._EpochOrder.__call__  # pylint: disable=protected-access

  def recording_call(self, position):
    positions.append(int(position))
    return call(self, position)

  # pylint: disable-next=protected-access
  monkeypatch.setattr(pipeline._EpochOrder, "__call__", recording_call)
  resumed = _take(_train(train_records, start_step=3), 2)
  _assert_batches_equal(full[3:5], resumed)
  assert positions and min(positions) >= 3 * 4


def test_process_sharding_concatenates_to_global_batch(train_records):
  whole = _take(_train(train_records, start_step=1), 3)
  parts = [_take(_train(train_records, start_step=1, process_index=p,
                        process_count=2), 3) for p in range(2)]
  for k, batch in enumerate(whole):
    for key in batch:
      assert parts[0][k][key].shape[0] == 2
      np.testing.assert_array_equal(
          np.concatenate([parts[0][k][key], parts[1][k][key]]), batch[key])


def test_stream_follows_epoch_permutations(train_records):
  # With no scaling, no flip and a crop larger than every image, the crop is
  # the padded image itself, so each row can be matched to its record.
  ds = _train(train_records, crop_size=(72, 72), scale_range=(1.0, 1.0),
              flip=False, seed=5)
  batches = _take(ds, 4)  # 16 positions: two epochs of 8 records.
  expected = pipeline.example_indices(len(train_records), 5, range(16))
  assert sorted(expected[:8]) == list(range(8)) == sorted(expected[8:])
  assert list(expected[:8]) != list(expected[8:])  # A new order per epoch.
  for pos, index in enumerate(expected):
    row = batches[pos // 4]
    image, label = voc.load_example(train_records[index], NUM_CLASSES)
    h, w = label.shape
    got_label = row["label"][pos % 4]
    np.testing.assert_array_equal(got_label[:h, :w], label)
    assert (got_label[h:] == 255).all() and (got_label[:, w:] == 255).all()
    got_image = row["image"][pos % 4]
    np.testing.assert_allclose(got_image[:h, :w], (image / 255.0 - MEAN) / STD,
                               atol=1e-5)
    assert np.abs(got_image[h:]).max(initial=0) < 1e-5  # Mean padding -> 0.


def test_load_error_names_file(voc_copy):
  records = voc.list_records(voc_copy, "train")
  with open(records[0].image_path, "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 truncated")
  ds = _train(records, seed=0)
  with pytest.raises(tf.errors.OpError) as e:
    _take(ds, 3)  # Two epochs: record 0 is in there.
  assert "DatasetError" in str(e.value)
  assert records[0].image_path in str(e.value)


def test_bad_batch_arguments(train_records):
  with pytest.raises(ValueError, match="divisible"):
    _train(train_records, global_batch_size=5, process_count=2)
  with pytest.raises(ValueError, match="process_index"):
    _train(train_records, process_index=2, process_count=2)


def test_eval_padding_valid_and_coverage(voc_root):
  records = voc.list_records(voc_root, "trainval")[:10]
  seen = []
  for p in range(2):
    ds = pipeline.eval_dataset(records, num_classes=NUM_CLASSES,
                               global_batch_size=4, pad_to=(72, 80),
                               process_index=p, process_count=2)
    batches = _take(ds, 100)
    assert len(batches) == pipeline.num_eval_steps(10, 4) == 3
    for batch in batches:
      assert batch["image"].shape == (2, 72, 80, 3)
      assert batch["label"].shape == (2, 72, 80) and batch["label"].dtype == np.int32
      for r in range(2):
        index, valid = batch["index"][r], batch["valid"][r]
        assert valid == (index >= 0)
        if not valid:
          assert (batch["label"][r] == 255).all() and not batch["image"][r].any()
          continue
        seen.append(int(index))
        image, label = voc.load_example(records[index], NUM_CLASSES)
        h, w = label.shape
        assert (batch["height"][r], batch["width"][r]) == (h, w)
        np.testing.assert_array_equal(batch["label"][r][:h, :w], label)
        assert (batch["label"][r][h:] == 255).all()
        assert (batch["label"][r][:, w:] == 255).all()
        np.testing.assert_allclose(batch["image"][r][:h, :w],
                                   (image / 255.0 - MEAN) / STD, atol=1e-5)
        assert not batch["image"][r][h:].any() and not batch["image"][r][:, w:].any()
  assert sorted(seen) == list(range(10))  # Every record exactly once.


def test_eval_image_larger_than_pad_names_file(voc_root):
  records = voc.list_records(voc_root, "val")
  ds = pipeline.eval_dataset(records, num_classes=NUM_CLASSES,
                             global_batch_size=2, pad_to=(40, 40))
  with pytest.raises(tf.errors.OpError) as e:
    _take(ds, 10)
  assert "larger than the eval pad size 40x40" in str(e.value)
  assert os.path.join(voc_root, "JPEGImages") in str(e.value)


# --- transforms ---------------------------------------------------------------


def _coded_example(h=30, w=37):
  # The image's red channel encodes the label, so any geometric mismatch
  # between the two shows up as a broken code.
  rng = np.random.default_rng(0)
  label = rng.integers(0, NUM_CLASSES, (h, w)).astype(np.uint8)
  label[:, :5] = 255
  label[0, :] = 3
  image = np.stack([label.astype(np.float32), rng.uniform(0, 255, (h, w)),
                    np.arange(w, dtype=np.float32)[None].repeat(h, 0)], -1)
  return image, label


def test_flip_moves_image_and_label_together():
  image, label = _coded_example()
  flipped = 0
  for s in range(8):
    out_image, out_label = transforms.random_flip(
        tf.constant(image), tf.constant(label), tf.constant([s, 0]))
    out_image, out_label = out_image.numpy(), out_label.numpy()
    np.testing.assert_array_equal(out_image[..., 0], out_label)
    if not np.array_equal(out_label, label):
      flipped += 1
      np.testing.assert_array_equal(out_label, label[:, ::-1])
      np.testing.assert_array_equal(out_image, image[:, ::-1])
  assert 0 < flipped < 8


def test_train_augment_keeps_image_label_alignment():
  image, label = _coded_example()
  mean = (0.0, 0.0, 0.0)
  std = (1.0, 1.0, 1.0)
  flips = set()
  for s in range(6):
    out_image, out_label = transforms.train_augment(
        tf.constant(image), tf.constant(label), tf.constant([7, s]),
        crop_size=(36, 40), scale_range=(1.0, 1.0), mean=mean, std=std)
    code = np.rint(out_image.numpy()[..., 0] * 255.0)
    out_label = out_label.numpy()
    assert out_label.shape == (36, 40) and out_label.dtype == np.int32
    real = out_label != 255
    np.testing.assert_array_equal(code[real], out_label[real])
    # Row 0 of the input is all 3: padding shows where the image went.
    # Padding is added bottom/right, then the flip may move it to the left.
    flipped = bool(out_label[0, 0] == 255)
    pad_cols = slice(0, 3) if flipped else slice(37, 40)
    img_cols = slice(3, 40) if flipped else slice(0, 37)
    assert (out_label[30:] == 255).all() and (out_label[:, pad_cols] == 255).all()
    assert (out_label[0, img_cols] == 3).all()
    assert not out_image.numpy()[:, pad_cols].any()
    col = out_image.numpy()[0, img_cols, 2] * 255.0
    assert flipped == bool(col[0] > col[-1])
    flips.add(flipped)
  assert flips == {True, False}


def test_scaled_labels_keep_only_original_ids():
  image, label = _coded_example()
  label[10:20, 10:20] = 5
  original = set(np.unique(label).tolist())
  sizes = set()
  for s in range(10):
    _, out = transforms.random_scale(tf.constant(image), tf.constant(label),
                                     tf.constant([s, 1]), (0.5, 2.0))
    sizes.add(out.shape)
    assert set(np.unique(out.numpy()).tolist()) <= original
    _, out = transforms.train_augment(tf.constant(image), tf.constant(label),
                                      tf.constant([s, 2]), crop_size=(40, 40))
    assert set(np.unique(out.numpy()).tolist()) <= original | {255}
  assert len(sizes) > 5


def test_pad_with_mean_normalises_to_zero():
  image = tf.zeros([5, 6, 3], tf.uint8)
  label = tf.zeros([5, 6], tf.uint8)
  mean = transforms.IMAGENET_MEAN
  image, label = transforms.pad_to_at_least(
      tf.cast(image, tf.float32), label, (8, 9), image_fill=[255 * m for m in mean])
  out = transforms.normalize(image).numpy()
  assert image.shape == (8, 9, 3) and label.shape == (8, 9)
  assert np.abs(out[5:]).max() < 1e-6 and np.abs(out[:, 6:]).max() < 1e-6
  assert (label.numpy()[5:] == 255).all() and (label.numpy()[:5, :6] == 0).all()


def _break(record):
  with open(record.image_path, "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 truncated")


def test_train_skips_bad_examples_deterministically(voc_copy):
  records = voc.list_records(voc_copy, "train")
  clean = _take(_train(records, seed=0), 4)
  _break(records[3])
  with pytest.raises(ValueError, match="on_bad_example"):
    _train(records, on_bad_example="ignore")
  runs = []
  for _ in range(2):
    bad = pipeline.BadExamples()
    runs.append(_take(_train(records, seed=0, on_bad_example="skip",
                             bad_examples=bad), 4))   # two epochs
    assert list(bad.errors) == [records[3].id]
    (message,) = bad.take_new()
    assert records[3].image_path in message and bad.take_new() == []
  _assert_batches_equal(runs[0], runs[1])     # same substitute every time
  # Batches without record 3 are unchanged; the one with it differs.
  order = pipeline.example_indices(len(records), 0, range(16))
  for step in range(4):
    rows = order[step * 4:(step + 1) * 4]
    same = all(np.array_equal(runs[0][step][k], clean[step][k])
               for k in clean[step])
    assert same == (3 not in rows), (step, rows)


def test_eval_skips_bad_examples_as_invalid(voc_copy):
  records = voc.list_records(voc_copy, "val")
  _break(records[1])
  bad = pipeline.BadExamples()
  ds = pipeline.eval_dataset(records, num_classes=NUM_CLASSES,
                             global_batch_size=2, pad_to=(72, 80),
                             on_bad_example="skip", bad_examples=bad)
  batches = _take(ds, 100)
  index = np.concatenate([b["index"] for b in batches])
  valid = np.concatenate([b["valid"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert list(index) == list(range(len(records)))
  assert list(valid) == [i != 1 for i in range(len(records))]
  assert (labels[1] == 255).all()
  assert list(bad.errors) == [records[1].id]
  with pytest.raises(tf.errors.OpError, match="DatasetError"):
    _take(pipeline.eval_dataset(records, num_classes=NUM_CLASSES,
                                global_batch_size=2, pad_to=(72, 80)), 100)
