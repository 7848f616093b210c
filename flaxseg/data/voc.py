"""PASCAL VOC 2012 and SBD (Semantic Boundaries Dataset) reading and validation.

This module turns a dataset directory into a list of :class:`Record` (one
image path and one mask path per example) and decodes a record into numpy
arrays. It is plain Python + numpy + Pillow + scipy, so both the tf.data
pipeline (through ``tf.numpy_function``) and offline tools can use it.

Every failure caused by the data on disk raises :class:`DatasetError` with the
offending path in the message: a bad file among ten thousand must be findable
from the error alone.

Layouts understood::

    VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    VOCdevkit/VOC2012/SegmentationClass/<id>.png        palette PNG, 255 = void
    VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt
    VOCdevkit/VOC2012/SegmentationClassAug/<id>.png     optional ("aug" labels;
                       also accepted next to VOC2012, i.e. in VOCdevkit/)
    benchmark_RELEASE/dataset/{img/<id>.jpg, cls/<id>.mat, train.txt, val.txt}

The ``train_aug`` split is the usual 10,582-image augmented training set:
(SBD train + SBD val + VOC train) minus VOC val.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
import scipy.io
from PIL import Image

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus",
    "car", "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike",
    "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
IGNORE_LABEL = 255
SPLITS = ("train", "val", "trainval", "train_aug")

# Directory names (relative to the VOC2012 dir) where augmented labels may live.
_AUG_DIRS = ("SegmentationClassAug", os.path.join(os.pardir, "SegmentationClassAug"))


class DatasetError(ValueError):
  """Raised when dataset files are missing, malformed or inconsistent."""


@dataclasses.dataclass(frozen=True)
class Record:
  """One example: an id and the paths of its image and its class mask.

  Attributes:
    id: the VOC image id, e.g. ``'2007_000032'``.
    image_path: path of the JPEG image.
    label_path: path of the mask: a palette/greyscale PNG or an SBD ``.mat``.
  """
  id: str
  image_path: str
  label_path: str


def voc_palette() -> np.ndarray:
  """Returns the standard VOC colour map.

  Entry ``i`` interleaves the bits of ``i``: bit ``3k`` goes to red, ``3k+1``
  to green and ``3k+2`` to blue, each at bit position ``7-k``. So class 1 is
  (128, 0, 0) and the void label 255 is (224, 224, 192).

  Returns:
    uint8 array of shape (256, 3).
  """
  palette = np.zeros((256, 3), np.uint8)
  for i in range(256):
    c, r, g, b = i, 0, 0, 0
    for k in range(8):
      r |= ((c >> 0) & 1) << (7 - k)
      g |= ((c >> 1) & 1) << (7 - k)
      b |= ((c >> 2) & 1) << (7 - k)
      c >>= 3
    palette[i] = (r, g, b)
  return palette


def find_voc_root(root: str) -> str:
  """Finds the ``VOC2012`` directory from a user-supplied path.

  Args:
    root: ``.../VOCdevkit/VOC2012``, ``.../VOCdevkit`` or the parent of
      ``VOCdevkit``.

  Returns:
    The path of the directory that holds ``JPEGImages`` and ``ImageSets``.

  Raises:
    DatasetError: if none of the candidate directories exists.
  """
  root = os.fspath(root)
  candidates = [root, os.path.join(root, "VOC2012"),
                os.path.join(root, "VOCdevkit", "VOC2012")]
  for cand in candidates:
    if (os.path.isdir(os.path.join(cand, "JPEGImages"))
        and os.path.isdir(os.path.join(cand, "ImageSets"))):
      return cand
  if not os.path.exists(root):
    raise DatasetError(f"VOC root {root!r} does not exist")
  raise DatasetError(
      f"no VOC2012 directory (with JPEGImages/ and ImageSets/) found under "
      f"{root!r}; looked at: {', '.join(candidates)}")


def read_split_file(path: str) -> list[str]:
  """Reads an id list (one id per line, blank lines ignored, order kept).

  Args:
    path: the text file, e.g. ``ImageSets/Segmentation/train.txt``.

  Returns:
    The ids, duplicates removed (first occurrence kept).

  Raises:
    DatasetError: if the file is missing or lists no ids.
  """
  if not os.path.isfile(path):
    raise DatasetError(f"split file {path!r} does not exist")
  with open(path) as f:
    # Some lists carry extra columns ("id label"); the id is the first one.
    ids = [line.split()[0] for line in f if line.strip()]
  if not ids:
    raise DatasetError(f"split file {path!r} is empty")
  return list(dict.fromkeys(ids))


def _aug_label_dir(voc_root: str) -> str | None:
  for name in _AUG_DIRS:
    d = os.path.normpath(os.path.join(voc_root, name))
    if os.path.isdir(d):
      return d
  return None


def list_records(root: str, split: str, *,
                 sbd_root: str | None = None) -> list[Record]:
  """Lists the examples of a split, checking that every file exists.

  Args:
    root: anything :func:`find_voc_root` accepts.
    split: ``'train'``, ``'val'``, ``'trainval'`` (VOC 2012 segmentation
      lists, masks from ``SegmentationClass``) or ``'train_aug'``.
      ``train_aug`` ids are (SBD train + SBD val + VOC train) minus VOC val,
      sorted; each mask is taken, in order of preference, from
      ``SegmentationClassAug/<id>.png`` (if that directory exists), SBD
      ``cls/<id>.mat`` (if ``sbd_root`` is given), VOC ``SegmentationClass``;
      each image from VOC ``JPEGImages`` or else SBD ``img/``. Without
      ``sbd_root`` the ids come from ``ImageSets/Segmentation/train_aug.txt``.
    sbd_root: the SBD ``benchmark_RELEASE/dataset`` directory.

  Returns:
    The records, in split-file order (sorted for ``train_aug``).

  Raises:
    DatasetError: naming the path, for a missing root, split file, image or
      mask, or an empty split.
  """
  voc_root = find_voc_root(root)
  seg_dir = os.path.join(voc_root, "ImageSets", "Segmentation")
  jpeg_dir = os.path.join(voc_root, "JPEGImages")
  cls_dir = os.path.join(voc_root, "SegmentationClass")

  if split in ("train", "val", "trainval"):
    ids = read_split_file(os.path.join(seg_dir, f"{split}.txt"))
    image_dirs, label_sources = [jpeg_dir], [(cls_dir, ".png")]
  elif split == "train_aug":
    # VOC val is the benchmark: it must never leak into training, whatever
    # the SBD lists say (SBD train contains many VOC 2012 val images).
    voc_val = set(read_split_file(os.path.join(seg_dir, "val.txt")))
    voc_train = read_split_file(os.path.join(seg_dir, "train.txt"))
    image_dirs, label_sources = [jpeg_dir], []
    aug_dir = _aug_label_dir(voc_root)
    if aug_dir is not None:
      label_sources.append((aug_dir, ".png"))
    if sbd_root is not None:
      sbd_root = os.fspath(sbd_root)
      if not os.path.isdir(sbd_root):
        raise DatasetError(f"SBD root {sbd_root!r} does not exist")
      sbd_ids = (read_split_file(os.path.join(sbd_root, "train.txt"))
                 + read_split_file(os.path.join(sbd_root, "val.txt")))
      image_dirs.append(os.path.join(sbd_root, "img"))
      label_sources.append((os.path.join(sbd_root, "cls"), ".mat"))
    else:
      aug_list = os.path.join(seg_dir, "train_aug.txt")
      if not os.path.isfile(aug_list):
        raise DatasetError(
            f"split 'train_aug' needs sbd_root (the SBD benchmark_RELEASE/"
            f"dataset directory) or the id list {aug_list!r}, which does not "
            f"exist")
      sbd_ids = read_split_file(aug_list)
    label_sources.append((cls_dir, ".png"))
    ids = sorted((set(sbd_ids) | set(voc_train)) - voc_val)
    if not ids:
      raise DatasetError(f"split 'train_aug' under {voc_root!r} is empty")
  else:
    raise DatasetError(f"unknown split {split!r}; expected one of {SPLITS}")

  records = []
  for id_ in ids:
    image_path = _first_existing([os.path.join(d, id_ + ".jpg") for d in image_dirs])
    if image_path is None:
      raise DatasetError(
          f"image {os.path.join(image_dirs[0], id_ + '.jpg')!r} listed in split "
          f"{split!r} does not exist")
    label_path = _first_existing(
        [os.path.join(d, id_ + ext) for d, ext in label_sources])
    if label_path is None:
      tried = ", ".join(os.path.join(d, id_ + ext) for d, ext in label_sources)
      raise DatasetError(
          f"image {image_path!r} (split {split!r}) has no mask; looked for: "
          f"{tried}")
    records.append(Record(id_, image_path, label_path))
  return records


def _first_existing(paths: Sequence[str]) -> str | None:
  for p in paths:
    if os.path.isfile(p):
      return p
  return None


def read_image(path: str) -> np.ndarray:
  """Decodes an image file to RGB.

  Args:
    path: a JPEG (or any format Pillow reads).

  Returns:
    uint8 array of shape (H, W, 3). Greyscale, palette, RGBA and CMYK images
    are converted to RGB.

  Raises:
    DatasetError: naming the file if it is missing or cannot be decoded.
  """
  try:
    with Image.open(path) as img:
      img.load()  # Decode now: a truncated file must fail here, not later.
      if img.mode != "RGB":
        img = img.convert("RGB")
      return np.asarray(img, dtype=np.uint8)
  except FileNotFoundError as e:
    raise DatasetError(f"image {path!r} does not exist") from e
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise DatasetError(f"cannot decode image {path!r}: {e}") from e


def read_label(path: str, num_classes: int) -> np.ndarray:
  """Reads a class mask and checks its values.

  PNG masks must be palette ('P') images, whose pixel values are the class
  ids (the colours are only for display), or 8-bit greyscale ('L') images
  holding raw ids, as in the common ``SegmentationClassAug`` release. An RGB
  mask is rejected rather than guessed back into ids. ``.mat`` files are read
  as SBD ``GTcls`` structs.

  Args:
    path: a ``.png`` or SBD ``.mat`` file.
    num_classes: valid ids are ``[0, num_classes)`` plus ``IGNORE_LABEL``.

  Returns:
    uint8 array of shape (H, W).

  Raises:
    DatasetError: naming the file if it is missing, cannot be decoded, is not
      a palette PNG, or holds ids outside the valid set (listing them).
  """
  if not os.path.isfile(path):
    raise DatasetError(f"mask {path!r} does not exist")
  if path.endswith(".mat"):
    label = _read_sbd_mat(path)
  else:
    try:
      with Image.open(path) as img:
        img.load()
        if img.mode not in ("P", "L"):
          raise DatasetError(
              f"mask {path!r} is not a palette PNG (mode {img.mode!r}); class "
              f"ids must be stored as palette indices (or 8-bit greyscale)")
        # np.asarray of a 'P' image gives the indices, not the colours.
        label = np.asarray(img, dtype=np.uint8)
        if img.mode == "P":
          check_mask_palette(f"mask {path!r}", img, label)
    except DatasetError:
      raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
      raise DatasetError(f"cannot decode mask {path!r}: {e}") from e
  values = np.unique(label)
  bad = values[(values >= num_classes) & (values != IGNORE_LABEL)]
  if bad.size:
    shown = ", ".join(str(int(v)) for v in bad[:10])
    raise DatasetError(
        f"mask {path!r} has values outside [0, {num_classes}) and "
        f"{IGNORE_LABEL}: {shown}{' ...' if bad.size > 10 else ''}")
  return label.astype(np.uint8, copy=False)


def check_mask_palette(where: str, img, label: np.ndarray) -> None:
  """Refuses a palette mask whose colours are not VOC's for its indices.

  In a VOC mask the palette index is the class and the colour only shows
  it; a mask drawn with another palette (another dataset's colours, or an
  RGB mask quantised to 'P' by an editor, whose indices follow the order the
  colours were met) has indices that are not VOC class ids. A greyscale
  palette (index i shown as (i, i, i)), or one too short to colour the
  indices used, is accepted: its indices are ids.

  Args:
    where: the mask, for the message (e.g. ``"mask '/path/x.png'"``).
    img: the open 'P' Pillow image.
    label: its indices.

  Raises:
    DatasetError: naming ``where`` and the first indices whose colours differ.
  """
  raw = img.getpalette()
  if raw is None:
    return
  colours = np.zeros((256, 3), np.uint8)
  raw = np.asarray(raw[:768], np.uint8).reshape(-1, 3)
  colours[:len(raw)] = raw
  # Indices past a short palette have no colour to judge.
  used = np.unique(label)
  used = used[used < len(raw)]
  voc = voc_palette()
  grey = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
  if (np.array_equal(colours[used], voc[used])
      or np.array_equal(colours[used], grey[used])):
    return
  wrong = [int(i) for i in used if not np.array_equal(colours[i], voc[i])]
  shown = ", ".join(f"index {i} is {tuple(int(c) for c in colours[i])} "
                    f"(VOC: {tuple(int(c) for c in voc[i])})"
                    for i in wrong[:3])
  raise DatasetError(
      f"{where} uses a different palette from VOC's ({shown}"
      f"{' ...' if len(wrong) > 3 else ''}), so its pixel values may not be "
      f"VOC class ids; re-save it with the VOC palette (class id = index) or "
      f"as 8-bit greyscale ids")


def _read_sbd_mat(path: str) -> np.ndarray:
  try:
    seg = scipy.io.loadmat(path)["GTcls"][0]["Segmentation"][0]
  # scipy raises many unrelated types (MatReadError, NotImplementedError for
  # v7.3 files, KeyError/IndexError for other structs); all mean "bad file".
  except Exception as e:  # pylint: disable=broad-except
    raise DatasetError(
        f"cannot read SBD mask {path!r} (expected a GTcls struct with a "
        f"Segmentation field): {e!r}") from e
  seg = np.asarray(seg)
  if seg.ndim != 2 or seg.dtype.kind not in "ui" or (seg.size and seg.min() < 0):
    raise DatasetError(
        f"SBD mask {path!r}: Segmentation is {seg.dtype} of shape {seg.shape},"
        f" expected a 2-D array of non-negative integers")
  if seg.size and seg.max() > 255:
    raise DatasetError(f"mask {path!r} has values above 255: max {seg.max()}")
  return seg.astype(np.uint8)


def load_example(record: Record, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """Reads and validates one example.

  Args:
    record: the example to read.
    num_classes: number of classes, for the mask value check.

  Returns:
    ``(image, label)``: uint8 (H, W, 3) and uint8 (H, W).

  Raises:
    DatasetError: from :func:`read_image` / :func:`read_label`, or if image and
      mask sizes differ (naming both files and both sizes).
  """
  image = read_image(record.image_path)
  label = read_label(record.label_path, num_classes)
  if image.shape[:2] != label.shape:
    raise DatasetError(
        f"image {record.image_path!r} is {image.shape[0]}x{image.shape[1]} "
        f"(HxW) but its mask {record.label_path!r} is "
        f"{label.shape[0]}x{label.shape[1]}")
  return image, label
