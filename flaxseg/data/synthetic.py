"""Generator of small synthetic datasets in the PASCAL VOC 2012 (and SBD) layout.

Tests and demos need data with the exact on-disk format of VOC (JPEG images,
palette-PNG masks with a void band, split lists) without downloading 2 GB, and
a task a small CNN can actually learn, so that "the loss goes down and mIoU
goes up" is a meaningful check. Each image has a noisy, randomly coloured
background and 1-3 objects. The class of an object is its *shape* (circle,
square, triangle, ...); colours are random and carry no information, so a
model must look at shape. Objects are 25-60% of the image side, large enough
to be seen at 1/8 resolution, and may occlude one another.

Everything is a function of ``seed``: the same arguments give byte-identical
files (the timestamp scipy writes into ``.mat`` headers is replaced by a fixed
text). Each image is drawn from its own generator seeded by
``(seed, kind, index)``, so adding images does not change the existing ones.

Command line::

    python -m flaxseg.data.synthetic --out /tmp/synth --num-train 200 --num-val 50
"""

from __future__ import annotations

import argparse
import io
import os
from typing import Sequence

import numpy as np
import scipy.io
from PIL import Image

from flaxseg.data import voc

SYNTH_CLASSES = ("background", "circle", "square", "triangle", "cross", "ring",
                 "star")
NUM_SYNTH_CLASSES = len(SYNTH_CLASSES)
#: Where the SBD-style tree goes, relative to ``root``.
SBD_SUBDIR = os.path.join("benchmark_RELEASE", "dataset")

_JPEG_QUALITY = 90
_VOC_ID, _SBD_ID = 0, 1  # "kind" component of the per-image seed.


def _shape_mask(cls: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Inside-test of shape ``cls`` on coordinates normalised by the radius."""
  name = SYNTH_CLASSES[cls]
  rho2 = u * u + v * v
  if name == "circle":
    return rho2 <= 1.0
  if name == "square":
    return np.maximum(np.abs(u), np.abs(v)) <= 0.85
  if name == "triangle":  # Apex up, base at v = 0.75.
    return (v <= 0.75) & (np.abs(u) <= 0.95 * (v + 1.0) / 1.75)
  if name == "cross":
    return (((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0))
            | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0)))
  if name == "ring":
    return (rho2 <= 1.0) & (rho2 >= 0.55 ** 2)
  if name == "star":  # Five points, one pointing up.
    theta = np.arctan2(u, -v)
    return np.sqrt(rho2) <= 0.45 + 0.55 * np.abs(np.cos(2.5 * theta)) ** 3
  raise ValueError(f"unknown class {cls}")


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int,
                  amplitude: float) -> np.ndarray:
  """Low-frequency colour noise: a random coarse grid, bilinearly upsampled."""
  grid = rng.uniform(-amplitude, amplitude, (cells, cells, 3)).astype(np.float32)
  ys = np.linspace(0, cells - 1, h, dtype=np.float32)
  xs = np.linspace(0, cells - 1, w, dtype=np.float32)
  y0 = np.minimum(ys.astype(int), cells - 2)
  x0 = np.minimum(xs.astype(int), cells - 2)
  fy = (ys - y0)[:, None, None]
  fx = (xs - x0)[None, :, None]
  g00 = grid[y0][:, x0]
  g01 = grid[y0][:, x0 + 1]
  g10 = grid[y0 + 1][:, x0]
  g11 = grid[y0 + 1][:, x0 + 1]
  return ((1 - fy) * ((1 - fx) * g00 + fx * g01)
          + fy * ((1 - fx) * g10 + fx * g11))


def _random_colour(rng: np.random.Generator, avoid: np.ndarray | None) -> np.ndarray:
  # An object the colour of the background is invisible: keep a margin.
  for _ in range(20):
    colour = rng.uniform(0, 255, 3).astype(np.float32)
    if avoid is None or np.abs(colour - avoid).sum() > 120:
      break
  return colour


def void_band(label: np.ndarray) -> np.ndarray:
  """Marks both sides of every class boundary as ``IGNORE_LABEL``.

  VOC annotators left a ~5 px void band along object outlines; this gives a
  2 px band (one pixel each side of the boundary).

  Args:
    label: uint8 (H, W) class map.

  Returns:
    A copy of ``label`` with boundary pixels set to 255.
  """
  edge = np.zeros(label.shape, bool)
  dx = label[:, 1:] != label[:, :-1]
  dy = label[1:, :] != label[:-1, :]
  edge[:, 1:] |= dx
  edge[:, :-1] |= dx
  edge[1:, :] |= dy
  edge[:-1, :] |= dy
  out = label.copy()
  out[edge] = voc.IGNORE_LABEL
  return out


def draw_example(rng: np.random.Generator, size: tuple[int, int], *,
                 max_objects: int = 3, top_class: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Draws one image and its class map (without void band).

  Args:
    rng: the generator to draw from.
    size: ``(height, width)``.
    max_objects: objects per image are uniform in ``[1, max_objects]``.
    top_class: if given, the top-most object has this class (used to make
      sure every class appears in a small dataset).

  Returns:
    ``(image, label)``: uint8 (H, W, 3) and uint8 (H, W) with ids in
    ``[0, len(SYNTH_CLASSES))``.
  """
  h, w = size
  bg_a = rng.uniform(0, 255, 3).astype(np.float32)
  bg_b = rng.uniform(0, 255, 3).astype(np.float32)
  angle = rng.uniform(0, 2 * np.pi)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  t = (np.cos(angle) * xx / w + np.sin(angle) * yy / h)
  t = ((t - t.min()) / max(float(np.ptp(t)), 1e-6))[..., None]
  image = (1 - t) * bg_a + t * bg_b + _smooth_noise(rng, h, w, 6, 40.0)
  label = np.zeros((h, w), np.uint8)
  bg_mean = (bg_a + bg_b) / 2

  n = int(rng.integers(1, max_objects + 1))
  classes = rng.integers(1, NUM_SYNTH_CLASSES, n)
  if top_class is not None:
    classes[-1] = top_class  # Drawn last, so it is never hidden.
  side = min(h, w)
  for cls in classes:
    radius = rng.uniform(0.25, 0.60) * side / 2
    # The centre may come near the border, so objects can be cut off.
    cy = rng.uniform(radius * 0.5, h - radius * 0.5)
    cx = rng.uniform(radius * 0.5, w - radius * 0.5)
    mask = _shape_mask(int(cls), (xx - cx) / radius, (yy - cy) / radius)
    colour = _random_colour(rng, bg_mean)
    texture = _smooth_noise(rng, h, w, 4, 25.0)
    image = np.where(mask[..., None], colour + texture, image)
    label[mask] = cls
  image = image + rng.normal(0, 6.0, image.shape).astype(np.float32)
  return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


def _example(seed: int, kind: int, index: int, image_size: tuple[int, int],
             max_objects: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng([seed, kind, index])
  h, w = (int(x) for x in rng.integers(image_size[0], image_size[1] + 1, 2))
  # Cycling the top object's class through all classes makes every class
  # appear in any dataset of at least NUM_SYNTH_CLASSES - 1 images.
  first = 1 + index % (NUM_SYNTH_CLASSES - 1)
  return draw_example(rng, (h, w), max_objects=max_objects, top_class=first)


def _write_jpeg(path: str, image: np.ndarray) -> None:
  Image.fromarray(image).save(path, format="JPEG", quality=_JPEG_QUALITY)


def write_palette_png(path: str, label: np.ndarray) -> None:
  """Writes a class map as a VOC palette PNG (pixel value = class id).

  Args:
    path: the output ``.png`` path.
    label: uint8 (H, W) class map.
  """
  img = Image.fromarray(label.astype(np.uint8))
  # putpalette turns the 'L' image into 'P' keeping the values as indices.
  img.putpalette(voc.voc_palette().tobytes())
  img.save(path, format="PNG")


def write_sbd_mat(path: str, label: np.ndarray) -> None:
  """Writes a class map as an SBD ``cls/*.mat`` file (``GTcls`` struct).

  The result is read by ``scipy.io.loadmat(p)["GTcls"][0]["Segmentation"][0]``.
  The MAT header normally embeds the current time; it is replaced with fixed
  text so the file is a pure function of ``label``.

  Args:
    path: the output ``.mat`` path.
    label: uint8 (H, W) class map.
  """
  present = np.unique(label[(label > 0) & (label != voc.IGNORE_LABEL)])
  gtcls = {
      "Segmentation": label.astype(np.uint8),
      "Boundaries": np.empty((0, 1), dtype=object),
      "CategoriesPresent": present.astype(np.uint8).reshape(-1, 1),
  }
  buf = io.BytesIO()
  scipy.io.savemat(buf, {"GTcls": gtcls}, do_compression=False)
  data = bytearray(buf.getvalue())
  header = b"MATLAB 5.0 MAT-file, written by flaxseg.data.synthetic"
  data[:116] = header.ljust(116, b" ")
  with open(path, "wb") as f:
    f.write(bytes(data))


def _write_ids(path: str, ids: Sequence[str]) -> None:
  with open(path, "w") as f:
    f.writelines(i + "\n" for i in ids)


def generate_voc_tree(root: str, *, num_train: int = 16, num_val: int = 8,
                      seed: int = 0, image_size: tuple[int, int] = (96, 160),
                      max_objects: int = 3, with_sbd: bool = False,
                      num_sbd_extra: int | None = None,
                      with_aug: bool = False) -> str:
  """Writes a synthetic dataset in the VOC 2012 layout.

  Layout written under ``root``::

    VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    VOCdevkit/VOC2012/SegmentationClass/<id>.png   palette PNG, 2 px void band
    VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt
    VOCdevkit/VOC2012/SegmentationClassAug/<id>.png (with_aug: train_aug + val
                                                    ids, greyscale, no void)
    benchmark_RELEASE/dataset/img/<id>.jpg, cls/<id>.mat, train.txt, val.txt
                                                   (with_sbd)

  VOC ids are ``2012_000000``... (the first ``num_train`` are train, the rest
  val). With ``with_sbd``, SBD lists ``num_sbd_extra`` images of its own
  (``2011_...``, written to SBD ``img/`` only) plus the first half of VOC
  train and of VOC val (copied into SBD ``img/``), so that ``train_aug`` must
  drop the VOC val ids SBD lists and fall back to VOC masks for the VOC train
  images SBD lacks. SBD masks have no void band, as in the real SBD.

  Args:
    root: output directory (created if needed).
    num_train: number of VOC train images.
    num_val: number of VOC val images.
    seed: everything written is a function of the arguments.
    image_size: ``(min, max)`` side length in pixels; height and width are
      drawn independently and uniformly, so images differ in size and shape.
    max_objects: objects per image are uniform in ``[1, max_objects]``.
    with_sbd: also write the SBD tree.
    num_sbd_extra: SBD-only images (default ``max(2, num_train // 2)``).
    with_aug: also write ``SegmentationClassAug`` (needs ``with_sbd``).

  Returns:
    The ``VOCdevkit/VOC2012`` directory.
  """
  if num_train < 1 or num_val < 1:
    raise ValueError(f"need num_train >= 1 and num_val >= 1, got "
                     f"{num_train} and {num_val}")
  if with_aug and not with_sbd:
    raise ValueError("with_aug=True needs with_sbd=True")
  lo, hi = image_size
  if not 16 <= lo <= hi:
    raise ValueError(f"image_size must be (min, max) with 16 <= min <= max, "
                     f"got {image_size}")
  voc_root = os.path.join(root, "VOCdevkit", "VOC2012")
  dirs = {k: os.path.join(voc_root, k) for k in
          ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation")}
  for d in dirs.values():
    os.makedirs(d, exist_ok=True)

  voc_ids = [f"2012_{i:06d}" for i in range(num_train + num_val)]
  labels = {}
  for i, id_ in enumerate(voc_ids):
    image, label = _example(seed, _VOC_ID, i, image_size, max_objects)
    _write_jpeg(os.path.join(dirs["JPEGImages"], id_ + ".jpg"), image)
    write_palette_png(os.path.join(dirs["SegmentationClass"], id_ + ".png"),
                      void_band(label))
    labels[id_] = (image, label)
  train_ids, val_ids = voc_ids[:num_train], voc_ids[num_train:]
  _write_ids(os.path.join(dirs["ImageSets/Segmentation"], "train.txt"), train_ids)
  _write_ids(os.path.join(dirs["ImageSets/Segmentation"], "val.txt"), val_ids)
  _write_ids(os.path.join(dirs["ImageSets/Segmentation"], "trainval.txt"), voc_ids)
  if not with_sbd:
    return voc_root

  sbd_root = os.path.join(root, SBD_SUBDIR)
  for sub in ("img", "cls"):
    os.makedirs(os.path.join(sbd_root, sub), exist_ok=True)
  n_extra = max(2, num_train // 2) if num_sbd_extra is None else num_sbd_extra
  extra_ids = [f"2011_{i:06d}" for i in range(n_extra)]
  for i, id_ in enumerate(extra_ids):
    labels[id_] = _example(seed, _SBD_ID, i, image_size, max_objects)
    _write_jpeg(os.path.join(sbd_root, "img", id_ + ".jpg"), labels[id_][0])
  sbd_voc_train = train_ids[:(num_train + 1) // 2]
  sbd_voc_val = val_ids[:(num_val + 1) // 2]
  for id_ in sbd_voc_train + sbd_voc_val:
    _write_jpeg(os.path.join(sbd_root, "img", id_ + ".jpg"), labels[id_][0])
  sbd_ids = sbd_voc_train + sbd_voc_val + extra_ids
  for id_ in sbd_ids:
    write_sbd_mat(os.path.join(sbd_root, "cls", id_ + ".mat"), labels[id_][1])
  # Split SBD's own lists so that both contain VOC val ids and extras.
  sbd_train = sorted(sbd_ids[0::2])
  sbd_val = sorted(sbd_ids[1::2])
  _write_ids(os.path.join(sbd_root, "train.txt"), sbd_train)
  _write_ids(os.path.join(sbd_root, "val.txt"), sbd_val)

  if with_aug:
    aug_dir = os.path.join(voc_root, "SegmentationClassAug")
    os.makedirs(aug_dir, exist_ok=True)
    # Like the public SegmentationClassAug: 8-bit greyscale ids for the
    # train_aug and val images, no void band.
    for id_ in sorted(set(sbd_ids) | set(voc_ids)):
      Image.fromarray(labels[id_][1]).save(
          os.path.join(aug_dir, id_ + ".png"), format="PNG")
  return voc_root


def main(argv: Sequence[str] | None = None) -> None:
  """Command-line entry point; prints the VOC2012 directory written."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True, help="output root directory")
  p.add_argument("--num-train", type=int, default=200)
  p.add_argument("--num-val", type=int, default=50)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--min-size", type=int, default=96)
  p.add_argument("--max-size", type=int, default=160)
  p.add_argument("--max-objects", type=int, default=3)
  p.add_argument("--with-sbd", action="store_true",
                 help="also write an SBD benchmark_RELEASE/dataset tree")
  p.add_argument("--with-aug", action="store_true",
                 help="also write SegmentationClassAug (implies --with-sbd)")
  args = p.parse_args(argv)
  path = generate_voc_tree(
      args.out, num_train=args.num_train, num_val=args.num_val, seed=args.seed,
      image_size=(args.min_size, args.max_size), max_objects=args.max_objects,
      with_sbd=args.with_sbd or args.with_aug, with_aug=args.with_aug)
  print(path)


if __name__ == "__main__":
  main()
