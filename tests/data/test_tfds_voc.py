"""Tests for the voc_segmentation TFDS builder, on fake archives made here.

Nothing is downloaded: every test writes a tiny VOCtrainval tar and SBD
benchmark.tgz (a few JPEGs, palette PNGs and .mat masks) into a temp dir. The
``tfds.testing.DatasetBuilderTestCase`` classes are pointed at that dir by
setting ``EXAMPLE_DIR`` in ``setUpClass`` (before TFDS first reads its
``dummy_data`` property); the harness hands ``dummy_data`` to the builder as
``manual_dir``, so the builder reads the archives as a user's manual download.
"""

import io
import shutil
import tarfile
import tempfile
from unittest import mock

import numpy as np
import PIL.Image
import pytest
import scipy.io
import tensorflow_datasets as tfds

from flaxseg.data import tfds_voc
from flaxseg.data import voc

# Fake ids: VOC train/val lists, SBD train/val lists, and one JPEG that is in
# no segmentation list. train_aug = (voc_train | sbd) - voc_val.
VOC_TRAIN = ("2007_000001", "2007_000002", "2007_000003")
VOC_VAL = ("2007_000004", "2007_000005")
SBD_TRAIN = ("2007_000002", "2008_000006", "2008_000007")
SBD_VAL = ("2007_000004", "2008_000008")
UNLISTED = "2009_000009"
TRAIN_AUG = ("2007_000001", "2007_000002", "2007_000003", "2008_000006",
             "2008_000007", "2008_000008")


def _mask(k, shape):
  rng = np.random.default_rng(k)
  values = np.array(list(range(21)) + [255], np.uint8)
  return rng.choice(values, size=shape).astype(np.uint8)


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _png(mask):
  img = PIL.Image.fromarray(mask, mode="P")
  # VOC colours, so the palette indices differ from the RGB values.
  img.putpalette(voc.voc_palette().ravel().tolist())
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return buf.getvalue()


def _jpeg(shape, k):
  rgb = np.random.default_rng(100 + k).integers(0, 255, shape + (3,), np.uint8)
  buf = io.BytesIO()
  PIL.Image.fromarray(rgb).save(buf, format="JPEG")
  return buf.getvalue()


def _mat(mask):
  buf = io.BytesIO()
  scipy.io.savemat(buf, {"GTcls": {"Segmentation": mask,
                                   "CategoriesPresent": np.array([1])}})
  return buf.getvalue()


def make_fake_archives(root, bad_voc=None, bad_sbd=None):
  """Writes fake VOC and SBD archives into ``root``.

  Args:
    root: output dir.
    bad_voc: id whose VOC PNG mask gets an invalid label (30).
    bad_sbd: id whose SBD .mat mask gets an invalid label (30).

  Returns:
    ``{split: {id: expected HxW uint8 mask}}``: VOC's masks for train and
    val, SBD's where SBD has the id (else VOC's) for train_aug.
  """
  all_ids = sorted(set(VOC_TRAIN + VOC_VAL + SBD_TRAIN + SBD_VAL + (UNLISTED,)))
  shapes = {i: (5 + k, 7 + 2 * k) for k, i in enumerate(all_ids)}
  voc_masks = {i: _mask(k, shapes[i]) for k, i in enumerate(all_ids)
               if i in VOC_TRAIN + VOC_VAL}
  sbd_masks = {i: _mask(50 + k, shapes[i]) for k, i in enumerate(all_ids)
               if i in SBD_TRAIN + SBD_VAL}
  for masks, bad in ((voc_masks, bad_voc), (sbd_masks, bad_sbd)):
    if bad is not None:
      masks[bad] = masks[bad].copy()
      masks[bad][0, 0] = 30
  base = "VOCdevkit/VOC2012/"
  with tarfile.open(f"{root}/{tfds_voc.VOC_TAR}", "w") as tar:
    for k, i in enumerate(all_ids):
      _add(tar, f"{base}JPEGImages/{i}.jpg", _jpeg(shapes[i], k))
    for i, m in voc_masks.items():
      _add(tar, f"{base}SegmentationClass/{i}.png", _png(m))
    for split, ids in (("train", VOC_TRAIN), ("val", VOC_VAL),
                       ("trainval", VOC_TRAIN + VOC_VAL)):
      _add(tar, f"{base}ImageSets/Segmentation/{split}.txt",
           "".join(f"{i}\n" for i in ids).encode())
  with tarfile.open(f"{root}/{tfds_voc.SBD_TGZ}", "w:gz") as tar:
    base = "benchmark_RELEASE/dataset/"
    for i, m in sbd_masks.items():
      _add(tar, f"{base}cls/{i}.mat", _mat(m))
    for split, ids in (("train", SBD_TRAIN), ("val", SBD_VAL)):
      _add(tar, f"{base}{split}.txt", "".join(f"{i}\n" for i in ids).encode())
  return {"train": voc_masks, "val": voc_masks,
          "train_aug": {**voc_masks, **sbd_masks}}


class _FakeArchivesMixin:
  """Generates the fake archives and points the TFDS harness at them."""

  @classmethod
  def setUpClass(cls):
    cls._fake_root = tempfile.mkdtemp()
    make_fake_archives(cls._fake_root)
    # Read by the harness's `dummy_data` (memoised on first success), which it
    # then patches in as `dl_manager.manual_dir` and `download_dir`.
    cls.EXAMPLE_DIR = cls._fake_root
    super().setUpClass()

  @classmethod
  def tearDownClass(cls):
    super().tearDownClass()
    shutil.rmtree(cls._fake_root, ignore_errors=True)


class VocSegmentation2012Test(_FakeArchivesMixin,
                              tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = tfds_voc.VocSegmentation
  BUILDER_CONFIG_NAMES_TO_TEST = ["2012"]
  SPLITS = {"train": len(VOC_TRAIN), "val": len(VOC_VAL)}
  SKIP_CHECKSUMS = True  # Archives come from manual_dir; no URL is fetched.


class VocSegmentationAugTest(_FakeArchivesMixin,
                             tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = tfds_voc.VocSegmentation
  BUILDER_CONFIG_NAMES_TO_TEST = ["2012_aug"]
  SPLITS = {"train": len(VOC_TRAIN), "val": len(VOC_VAL),
            "train_aug": len(TRAIN_AUG)}
  OVERLAPPING_SPLITS = ["train_aug"]  # It contains VOC train by definition.
  SKIP_CHECKSUMS = True


def _prepare(config, data_dir, manual_dir):
  builder = tfds_voc.VocSegmentation(config=config, data_dir=str(data_dir))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual_dir),
      compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder


def _examples(builder, split):
  ds = builder.as_dataset(split=split, shuffle_files=False)
  return {ex["id"].decode(): ex for ex in tfds.as_numpy(ds)}


@pytest.fixture(scope="module")
def aug_build(tmp_path_factory):
  """2012_aug built from manual_dir while download fails if called."""
  manual = tmp_path_factory.mktemp("manual")
  expected = make_fake_archives(manual)
  with mock.patch.object(tfds.download.DownloadManager, "download",
                         side_effect=AssertionError("download called")) as dl:
    builder = _prepare("2012_aug", tmp_path_factory.mktemp("data"), manual)
  return builder, expected, dl


def test_manual_dir_preferred_over_download(aug_build):
  _, _, download = aug_build
  download.assert_not_called()


def test_segmentation_equals_palette_indices(aug_build):
  builder, expected, _ = aug_build
  for split in ("train", "val", "train_aug"):
    for image_id, ex in _examples(builder, split).items():
      want = expected[split][image_id]
      assert ex["segmentation"].shape == want.shape + (1,)
      assert ex["segmentation"].dtype == np.uint8
      np.testing.assert_array_equal(ex["segmentation"][..., 0], want)
      assert ex["image"].shape == want.shape + (3,)
      assert ex["file_name"].decode() == f"{image_id}.jpg"


def test_split_ids(aug_build):
  builder, _, _ = aug_build
  ids = {s: set(_examples(builder, s)) for s in ("train", "val", "train_aug")}
  assert ids["train"] == set(VOC_TRAIN)
  assert ids["val"] == set(VOC_VAL)
  assert ids["train_aug"] == set(TRAIN_AUG)
  assert not ids["train_aug"] & ids["val"]
  assert UNLISTED not in set().union(*ids.values())


def test_downloads_when_manual_dir_empty(tmp_path):
  fake = tmp_path / "fake"
  fake.mkdir()
  make_fake_archives(fake)
  (tmp_path / "manual").mkdir()
  by_url = {url: fake / name for name, url in tfds_voc.URLS.items()}
  with mock.patch.object(tfds.download.DownloadManager, "download",
                         side_effect=lambda url: by_url[url]) as dl:
    builder = _prepare("2012", tmp_path / "data", tmp_path / "manual")
  dl.assert_called_once_with(tfds_voc.URLS[tfds_voc.VOC_TAR])
  assert builder.info.splits["train"].num_examples == len(VOC_TRAIN)


@pytest.mark.parametrize("config,bad,where", [
    ("2012", {"bad_voc": VOC_VAL[0]}, f"SegmentationClass/{VOC_VAL[0]}.png"),
    ("2012_aug", {"bad_sbd": SBD_VAL[1]}, f"cls/{SBD_VAL[1]}.mat"),
])
def test_bad_label_names_file(tmp_path, config, bad, where):
  make_fake_archives(tmp_path, **bad)
  with pytest.raises(voc.DatasetError, match=where):
    _prepare(config, tmp_path / "data", tmp_path)


def test_check_labels_and_rgb_mask():
  ok = np.array([[0, 20, 255]], np.uint8)
  np.testing.assert_array_equal(tfds_voc.check_labels(ok, "f"), ok)
  with pytest.raises(voc.DatasetError, match=r"f.png: label values \[21"):
    tfds_voc.check_labels(np.array([[21, 254]], np.uint8), "f.png")
  buf = io.BytesIO()
  PIL.Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(buf, format="PNG")
  with pytest.raises(voc.DatasetError, match="x.png.*mode 'RGB'"):
    tfds_voc.decode_png_mask(buf.getvalue(), "x.png")
  img = PIL.Image.fromarray(np.array([[0, 1], [2, 255]], np.uint8), "P")
  img.putpalette(voc.voc_palette()[::-1].tobytes())   # not VOC's colours
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  with pytest.raises(voc.DatasetError, match="y.png uses a different palette"):
    tfds_voc.decode_png_mask(buf.getvalue(), "y.png")


def test_cli(tmp_path, capsys):
  make_fake_archives(tmp_path)
  builder = tfds_voc.main(["--data_dir", str(tmp_path / "data"),
                           "--manual_dir", str(tmp_path)])
  assert builder.info.splits["val"].num_examples == len(VOC_VAL)
  out = capsys.readouterr().out
  assert "voc_segmentation/2012/1.0.0 train: 3 examples" in out
