"""Tests for flaxseg.data.voc: listing, decoding and validation on generated trees."""

import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from flaxseg.data import synthetic
from flaxseg.data import voc

NUM_CLASSES = synthetic.NUM_SYNTH_CLASSES


def _ids(path):
  with open(path) as f:
    return [line.strip() for line in f if line.strip()]


def test_palette_matches_voc_colours():
  pal = voc.voc_palette()
  assert pal.shape == (256, 3) and pal.dtype == np.uint8
  assert tuple(pal[0]) == (0, 0, 0)
  assert tuple(pal[1]) == (128, 0, 0)           # aeroplane
  assert tuple(pal[15]) == (192, 128, 128)      # person
  assert tuple(pal[20]) == (0, 64, 128)         # tvmonitor
  assert tuple(pal[255]) == (224, 224, 192)     # void
  assert len(voc.VOC_CLASSES) == 21 and voc.IGNORE_LABEL == 255


def test_find_voc_root_accepts_three_levels(voc_tree):
  devkit = os.path.dirname(voc_tree.voc_root)
  for path in (voc_tree.voc_root, devkit, voc_tree.root):
    assert voc.find_voc_root(path) == voc_tree.voc_root


@pytest.mark.parametrize("split,count", [("train", 8), ("val", 4), ("trainval", 12)])
def test_list_records_counts_and_paths(voc_root, split, count):
  records = voc.list_records(voc_root, split)
  assert len(records) == count
  expected = _ids(os.path.join(voc_root, "ImageSets", "Segmentation", f"{split}.txt"))
  assert [r.id for r in records] == expected
  for r in records:
    assert r.image_path == os.path.join(voc_root, "JPEGImages", r.id + ".jpg")
    assert r.label_path == os.path.join(voc_root, "SegmentationClass", r.id + ".png")


def test_train_and_val_are_disjoint(voc_root):
  train = {r.id for r in voc.list_records(voc_root, "train")}
  val = {r.id for r in voc.list_records(voc_root, "val")}
  assert not train & val


def test_load_example_dtypes_and_values(voc_root):
  for record in voc.list_records(voc_root, "trainval")[:4]:
    image, label = voc.load_example(record, NUM_CLASSES)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert label.dtype == np.uint8 and label.shape == image.shape[:2]
    values = set(np.unique(label).tolist())
    assert values <= set(range(NUM_CLASSES)) | {255}
    assert 0 in values and 255 in values  # Background and the void band.


def test_read_image_converts_modes_to_rgb(tmp_path):
  rgb = np.random.default_rng(0).integers(0, 255, (8, 10, 3), dtype=np.uint8)
  for mode, ext in (("L", "png"), ("RGBA", "png"), ("P", "png"), ("CMYK", "jpg")):
    path = str(tmp_path / f"im_{mode}.{ext}")
    Image.fromarray(rgb).convert(mode).save(path)
    out = voc.read_image(path)
    assert out.shape == (8, 10, 3) and out.dtype == np.uint8, mode


def test_read_label_greyscale_png_is_ids(tmp_path):
  ids = np.array([[0, 1], [6, 255]], np.uint8)
  path = str(tmp_path / "aug.png")
  Image.fromarray(ids).save(path)  # 'L' mode, like SegmentationClassAug.
  np.testing.assert_array_equal(voc.read_label(path, NUM_CLASSES), ids)


def test_sbd_mat_matches_voc_mask(sbd_tree):
  some_id = _ids(os.path.join(sbd_tree.sbd_root, "train.txt"))[0]
  mat = voc.read_label(os.path.join(sbd_tree.sbd_root, "cls", some_id + ".mat"),
                       NUM_CLASSES)
  assert mat.dtype == np.uint8 and 255 not in mat  # SBD has no void band.
  png = os.path.join(sbd_tree.voc_root, "SegmentationClass", some_id + ".png")
  if os.path.exists(png):
    voc_label = voc.read_label(png, NUM_CLASSES)
    keep = voc_label != 255
    np.testing.assert_array_equal(mat[keep], voc_label[keep])


def _expected_train_aug(tree):
  seg = os.path.join(tree.voc_root, "ImageSets", "Segmentation")
  sbd = (set(_ids(os.path.join(tree.sbd_root, "train.txt")))
         | set(_ids(os.path.join(tree.sbd_root, "val.txt"))))
  return sorted((sbd | set(_ids(os.path.join(seg, "train.txt"))))
                - set(_ids(os.path.join(seg, "val.txt"))))


def test_train_aug_composition_and_sbd_labels(sbd_tree):
  records = voc.list_records(sbd_tree.root, "train_aug", sbd_root=sbd_tree.sbd_root)
  ids = [r.id for r in records]
  assert ids == _expected_train_aug(sbd_tree)
  assert len(ids) == sbd_tree.num_train + sbd_tree.num_sbd_extra
  val = set(_ids(os.path.join(sbd_tree.voc_root, "ImageSets", "Segmentation", "val.txt")))
  sbd_all = set(_ids(os.path.join(sbd_tree.sbd_root, "train.txt"))
                + _ids(os.path.join(sbd_tree.sbd_root, "val.txt")))
  assert val & sbd_all, "the generated SBD must list VOC val ids"
  assert not val & set(ids)
  for r in records:
    if r.id in sbd_all:  # SBD .mat preferred over VOC SegmentationClass.
      assert r.label_path == os.path.join(sbd_tree.sbd_root, "cls", r.id + ".mat")
    else:
      assert r.label_path == os.path.join(
          sbd_tree.voc_root, "SegmentationClass", r.id + ".png")
    voc_jpeg = os.path.join(sbd_tree.voc_root, "JPEGImages", r.id + ".jpg")
    assert r.image_path == (voc_jpeg if os.path.exists(voc_jpeg) else
                            os.path.join(sbd_tree.sbd_root, "img", r.id + ".jpg"))
  kinds = {os.path.splitext(r.label_path)[1] for r in records}
  assert kinds == {".mat", ".png"}
  for r in records[:3] + records[-3:]:
    voc.load_example(r, NUM_CLASSES)


def test_train_aug_prefers_segmentation_class_aug(sbd_aug_tree):
  records = voc.list_records(sbd_aug_tree.voc_root, "train_aug",
                             sbd_root=sbd_aug_tree.sbd_root)
  assert [r.id for r in records] == _expected_train_aug(sbd_aug_tree)
  aug = os.path.join(sbd_aug_tree.voc_root, "SegmentationClassAug")
  assert all(r.label_path == os.path.join(aug, r.id + ".png") for r in records)
  image, label = voc.load_example(records[0], NUM_CLASSES)
  assert label.shape == image.shape[:2]


def test_train_aug_without_sbd_uses_id_list(sbd_aug_tree, tmp_path):
  root = str(tmp_path / "t")
  shutil.copytree(sbd_aug_tree.root, root)
  voc_root = voc.find_voc_root(root)
  with pytest.raises(voc.DatasetError, match="train_aug.txt"):
    voc.list_records(root, "train_aug")
  expected = _expected_train_aug(sbd_aug_tree)
  seg = os.path.join(voc_root, "ImageSets", "Segmentation")
  val = _ids(os.path.join(seg, "val.txt"))
  with open(os.path.join(seg, "train_aug.txt"), "w") as f:
    f.write("\n".join(expected + val[:1]) + "\n")  # A stray val id is dropped.
  # SegmentationClassAug next to VOC2012 (in VOCdevkit/) is found too.
  shutil.move(os.path.join(voc_root, "SegmentationClassAug"),
              os.path.join(os.path.dirname(voc_root), "SegmentationClassAug"))
  shutil.rmtree(os.path.join(root, "benchmark_RELEASE"))
  for id_ in expected:  # Real SBD images are all in VOC2012 JPEGImages.
    src = os.path.join(sbd_aug_tree.sbd_root, "img", id_ + ".jpg")
    dst = os.path.join(voc_root, "JPEGImages", id_ + ".jpg")
    if not os.path.exists(dst):
      shutil.copy(src, dst)
  records = voc.list_records(root, "train_aug")
  assert [r.id for r in records] == expected
  assert all("SegmentationClassAug" in r.label_path for r in records)


# --- Bad input: every failure is a DatasetError that names the file. ---------


def test_missing_root(tmp_path):
  path = str(tmp_path / "nowhere")
  with pytest.raises(voc.DatasetError, match="nowhere"):
    voc.list_records(path, "train")
  os.makedirs(path)
  with pytest.raises(voc.DatasetError, match="nowhere"):
    voc.find_voc_root(path)


def test_missing_split_file(voc_copy):
  path = os.path.join(voc_copy, "ImageSets", "Segmentation", "val.txt")
  os.remove(path)
  with pytest.raises(voc.DatasetError, match=re.escape(path)):
    voc.list_records(voc_copy, "val")


def test_empty_split_file(voc_copy):
  path = os.path.join(voc_copy, "ImageSets", "Segmentation", "val.txt")
  open(path, "w").close()
  with pytest.raises(voc.DatasetError, match=re.escape(path) + ".*empty"):
    voc.list_records(voc_copy, "val")


def test_unknown_split(voc_root):
  with pytest.raises(voc.DatasetError, match="unknown split"):
    voc.list_records(voc_root, "test")


def test_listed_image_missing(voc_copy):
  path = os.path.join(voc_copy, "JPEGImages", "2012_000001.jpg")
  os.remove(path)
  with pytest.raises(voc.DatasetError, match=re.escape(path)):
    voc.list_records(voc_copy, "train")


def test_listed_image_without_mask(voc_copy):
  os.remove(os.path.join(voc_copy, "SegmentationClass", "2012_000002.png"))
  with pytest.raises(voc.DatasetError, match="2012_000002.jpg.*no mask"):
    voc.list_records(voc_copy, "train")


def _record(voc_root, id_="2012_000000"):
  return voc.Record(id_, os.path.join(voc_root, "JPEGImages", id_ + ".jpg"),
                    os.path.join(voc_root, "SegmentationClass", id_ + ".png"))


def _rewrite_label(record, fn):
  with Image.open(record.label_path) as img:
    ids = np.asarray(img)
  out = Image.fromarray(fn(ids.copy()))
  out.putpalette(voc.voc_palette().tobytes())
  out.save(record.label_path)


def test_size_mismatch_names_both_files(voc_copy):
  record = _record(voc_copy)
  _rewrite_label(record, lambda ids: ids[:-3, :-1])
  with pytest.raises(voc.DatasetError) as e:
    voc.load_example(record, NUM_CLASSES)
  msg = str(e.value)
  assert record.image_path in msg and record.label_path in msg
  h, w = voc.read_image(record.image_path).shape[:2]
  assert f"{h}x{w}" in msg and f"{h - 3}x{w - 1}" in msg


def test_bad_label_value(voc_copy):
  record = _record(voc_copy)

  def put_30(ids):
    ids[0, :4] = 30
    return ids

  _rewrite_label(record, put_30)
  with pytest.raises(voc.DatasetError, match=re.escape(record.label_path) + ".*: 30"):
    voc.load_example(record, NUM_CLASSES)
  voc.load_example(record, 31)  # Valid with enough classes.


def test_corrupt_jpeg(voc_copy):
  record = _record(voc_copy)
  with open(record.image_path, "rb") as f:
    data = f.read()
  with open(record.image_path, "wb") as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(voc.DatasetError, match=re.escape(record.image_path)):
    voc.load_example(record, NUM_CLASSES)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_png(voc_copy, damage):
  record = _record(voc_copy)
  with open(record.label_path, "rb") as f:
    data = f.read()
  with open(record.label_path, "wb") as f:
    f.write(data[: len(data) // 2] if damage == "truncate" else b"not a png" * 10)
  with pytest.raises(voc.DatasetError, match=re.escape(record.label_path)):
    voc.load_example(record, NUM_CLASSES)


def test_rgb_mask_rejected(voc_copy):
  record = _record(voc_copy)
  with Image.open(record.label_path) as img:
    img.convert("RGB").save(record.label_path)
  with pytest.raises(voc.DatasetError,
                     match=re.escape(record.label_path) + ".*not a palette PNG"):
    voc.load_example(record, NUM_CLASSES)


def test_corrupt_mat(tmp_path):
  path = str(tmp_path / "x.mat")
  with open(path, "wb") as f:
    f.write(b"\x00" * 200)
  with pytest.raises(voc.DatasetError, match=re.escape(path)):
    voc.read_label(path, NUM_CLASSES)


def test_mask_with_another_palette_is_refused(voc_copy):
  record = _record(voc_copy)
  with Image.open(record.label_path) as img:
    ids = np.asarray(img)
  other = np.random.default_rng(0).integers(0, 256, (256, 3), np.uint8)
  out = Image.fromarray(ids)
  out.putpalette(other.tobytes())
  out.save(record.label_path)
  with pytest.raises(voc.DatasetError,
                     match=re.escape(record.label_path) +
                     ".*different palette from VOC's.*index"):
    voc.load_example(record, NUM_CLASSES)


def test_mask_with_greyscale_palette_is_ids(voc_copy):
  record = _record(voc_copy)
  with Image.open(record.label_path) as img:
    ids = np.asarray(img).copy()
  out = Image.fromarray(ids, "P")
  out.putpalette(np.repeat(np.arange(256, dtype=np.uint8), 3).tobytes())
  out.save(record.label_path)
  np.testing.assert_array_equal(voc.read_label(record.label_path, NUM_CLASSES),
                                ids)
