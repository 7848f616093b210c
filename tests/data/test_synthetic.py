"""Tests for flaxseg.data.synthetic: format, determinism, class coverage."""

import os

import numpy as np
import pytest
from PIL import Image

from flaxseg.data import synthetic
from flaxseg.data import voc

NUM_CLASSES = synthetic.NUM_SYNTH_CLASSES


def _tree_bytes(root):
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def _small_tree(root, seed):
  synthetic.generate_voc_tree(str(root), num_train=3, num_val=2, seed=seed,
                              image_size=(24, 40), with_sbd=True, with_aug=True,
                              num_sbd_extra=2)
  return _tree_bytes(str(root))


def test_same_seed_gives_identical_bytes(tmp_path):
  a = _small_tree(tmp_path / "a", seed=3)
  b = _small_tree(tmp_path / "b", seed=3)
  assert sorted(a) == sorted(b)
  assert any(k.endswith(".mat") for k in a)  # .mat headers carry no timestamp.
  for key in a:
    assert a[key] == b[key], key


def test_different_seed_gives_different_images(tmp_path):
  a = _small_tree(tmp_path / "a", seed=3)
  c = _small_tree(tmp_path / "c", seed=4)
  assert sorted(a) == sorted(c)  # Same layout and ids ...
  jpegs = [k for k in a if k.endswith(".jpg")]
  assert all(a[k] != c[k] for k in jpegs)  # ... different content.


def test_layout_and_sizes(voc_tree):
  records = voc.list_records(voc_tree.voc_root, "trainval")
  assert len(records) == voc_tree.num_train + voc_tree.num_val
  sizes = set()
  for r in records:
    with Image.open(r.image_path) as img:
      assert img.format == "JPEG" and img.mode == "RGB"
      sizes.add(img.size)
      assert all(40 <= s <= 72 for s in img.size)
    with Image.open(r.label_path) as mask:
      assert mask.format == "PNG" and mask.mode == "P"
      palette = np.asarray(mask.getpalette()[:768], np.uint8).reshape(-1, 3)
      np.testing.assert_array_equal(palette, voc.voc_palette()[:len(palette)])
  assert len(sizes) > 1, "image sizes should vary"


def test_all_classes_present_with_void_band(voc_root):
  seen = set()
  for r in voc.list_records(voc_root, "trainval"):
    _, label = voc.load_example(r, NUM_CLASSES)
    seen |= set(np.unique(label).tolist())
    # The void band separates every object from the background: no
    # background pixel touches an object pixel horizontally.
    a, b = label[:, 1:], label[:, :-1]
    touching = ((a == 0) & (b != 0) & (b != 255)) | ((b == 0) & (a != 0) & (a != 255))
    assert not touching.any(), r.label_path
    void = (label == 255).mean()
    assert 0 < void < 0.3, (r.label_path, void)
  assert seen == set(range(NUM_CLASSES)) | {255}


def test_objects_are_large_and_colour_is_not_class(voc_root):
  fractions, colours = [], {c: [] for c in range(1, NUM_CLASSES)}
  for r in voc.list_records(voc_root, "trainval"):
    image, label = voc.load_example(r, NUM_CLASSES)
    fractions.append(((label > 0) & (label < 255)).mean())
    for c in np.unique(label):
      if 0 < c < 255:
        colours[int(c)].append(image[label == c].mean(0))
  assert min(fractions) > 0.02
  # The same class appears in clearly different colours.
  spread = [np.ptp(np.stack(v), axis=0).max() for v in colours.values() if len(v) > 1]
  assert spread and max(spread) > 60


def test_draw_example_shapes_are_distinct():
  # Drawn alone and centred, each class covers a different set of pixels.
  masks = []
  yy, xx = np.mgrid[-20:21, -20:21] / 18.0
  for c in range(1, NUM_CLASSES):
    masks.append(synthetic._shape_mask(c, xx, yy))  # pylint: disable=protected-access
  for i in range(len(masks)):
    for j in range(i + 1, len(masks)):
      iou = (masks[i] & masks[j]).sum() / (masks[i] | masks[j]).sum()
      assert iou < 0.85, (synthetic.SYNTH_CLASSES[i + 1], synthetic.SYNTH_CLASSES[j + 1])


def test_sbd_mats_have_no_void(sbd_tree):
  cls_dir = os.path.join(sbd_tree.sbd_root, "cls")
  names = sorted(os.listdir(cls_dir))
  assert len(names) >= sbd_tree.num_sbd_extra
  for name in names[:3]:
    label = voc.read_label(os.path.join(cls_dir, name), NUM_CLASSES)
    assert 255 not in label and label.max() > 0


def test_cli(tmp_path, capsys):
  synthetic.main(["--out", str(tmp_path), "--num-train", "2", "--num-val", "1",
                  "--min-size", "24", "--max-size", "32"])
  path = capsys.readouterr().out.strip()
  assert path == os.path.join(str(tmp_path), "VOCdevkit", "VOC2012")
  assert len(voc.list_records(str(tmp_path), "train")) == 2


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="with_sbd"):
    synthetic.generate_voc_tree(str(tmp_path), with_aug=True)
  with pytest.raises(ValueError, match="image_size"):
    synthetic.generate_voc_tree(str(tmp_path), image_size=(64, 32))
