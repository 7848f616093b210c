"""TFDS builder for PASCAL VOC 2012 semantic segmentation (plus SBD train_aug).

tensorflow-datasets ships ``voc`` with boxes only; this builder adds the
segmentation task as ``voc_segmentation``:

* ``voc_segmentation/2012``: VOC 2012 ``train`` (1,464 images) and ``val``
  (1,449) from ``VOCtrainval_11-May-2012.tar``.
* ``voc_segmentation/2012_aug``: the same plus ``train_aug`` (10,582 images):
  (SBD train | SBD val | VOC train) minus VOC val, the usual DeepLab training
  set. Images come from the VOC tar (its JPEGImages hold every SBD image).
  ``train_aug`` masks come from SBD's ``benchmark.tgz`` where SBD has the id
  and from VOC's ``SegmentationClass`` otherwise, which is how the standard
  ``SegmentationClassAug`` set was made and the rule ``flaxseg.data.voc``
  follows; ``train`` and ``val`` always use VOC's own masks.

Features: ``image`` (uint8 HxWx3), ``segmentation`` (uint8 HxWx1 class ids
0..20, 255 = void), ``file_name`` (``<id>.jpg``) and ``id``.

The archives are taken from ``manual_dir`` when they are there, else
downloaded. They are streamed, never extracted: one pass indexes the split
lists and the (small) masks, then one pass per split streams the JPEGs.

Build from the command line (importing this module registers the builder)::

    python -m flaxseg.data.tfds_voc --data_dir ~/tensorflow_datasets \\
        --manual_dir ~/downloads/voc --config 2012_aug
"""

from __future__ import annotations

import argparse
import io
import re
from typing import Iterable, Iterator, Mapping, Optional, Tuple

from etils import epath
import numpy as np
import PIL.Image
import scipy.io
import tensorflow_datasets as tfds

from flaxseg.data import voc
from flaxseg.data.voc import DatasetError, IGNORE_LABEL, VOC_CLASSES

NUM_CLASSES = len(VOC_CLASSES)

VOC_TAR = "VOCtrainval_11-May-2012.tar"
SBD_TGZ = "benchmark.tgz"
URLS = {
    VOC_TAR: "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/"
             "VOCtrainval_11-May-2012.tar",
    SBD_TGZ: "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/"
             "grouping/semantic_contours/benchmark.tgz",
}

# Matched on the end of member paths, so a re-packed tar with another prefix
# (or none) above VOC2012/ or dataset/ still reads.
_VOC_SPLIT_RE = re.compile(r"(?:^|/)VOC2012/ImageSets/Segmentation/(\w+)\.txt$")
_VOC_MASK_RE = re.compile(r"(?:^|/)VOC2012/SegmentationClass/([^/]+)\.png$")
_VOC_IMAGE_RE = re.compile(r"(?:^|/)VOC2012/JPEGImages/([^/]+)\.jpg$")
_SBD_SPLIT_RE = re.compile(r"(?:^|/)dataset/(train|val)\.txt$")
_SBD_MASK_RE = re.compile(r"(?:^|/)dataset/cls/([^/]+)\.mat$")

# id -> (where the mask came from, PNG bytes of class ids).
MaskIndex = Mapping[str, Tuple[str, bytes]]

_CITATION = r"""
@article{everingham2010pascal,
  author = {Everingham, M. and Van~Gool, L. and Williams, C. K. I. and
            Winn, J. and Zisserman, A.},
  title = {The {PASCAL} Visual Object Classes ({VOC}) Challenge},
  journal = {International Journal of Computer Vision},
  volume = {88}, number = {2}, pages = {303--338}, year = {2010}}
@inproceedings{hariharan2011semantic,
  author = {Hariharan, Bharath and Arbel{\'a}ez, Pablo and Bourdev, Lubomir
            and Maji, Subhransu and Malik, Jitendra},
  title = {Semantic Contours from Inverse Detectors},
  booktitle = {International Conference on Computer Vision (ICCV)},
  pages = {991--998}, year = {2011}}
"""


def check_labels(mask: np.ndarray, where: str) -> np.ndarray:
  """Checks that a mask holds only class ids 0..20 and 255 (void).

  Args:
    mask: integer HxW array of class ids.
    where: file the mask came from, for the error message.

  Returns:
    ``mask`` as uint8.

  Raises:
    DatasetError: (from ``flaxseg.data.voc``) naming ``where`` and the
      offending values.
  """
  if mask.ndim != 2 or mask.dtype.kind not in "ui":
    raise DatasetError(f"{where}: expected an HxW integer mask, got "
                       f"shape {mask.shape} dtype {mask.dtype}")
  if mask.dtype == np.uint8:  # bincount is ~10x faster than unique here.
    values = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
  else:
    values = np.unique(mask)
  bad = values[((values < 0) | (values >= NUM_CLASSES))
               & (values != IGNORE_LABEL)]
  if bad.size:
    raise DatasetError(f"{where}: label values {bad.tolist()} are outside "
                       f"0..{NUM_CLASSES - 1} and {IGNORE_LABEL} (void)")
  return mask.astype(np.uint8)


def decode_png_mask(data: bytes, where: str) -> np.ndarray:
  """Decodes a VOC mask PNG to class ids (palette indices), validated.

  ``tf.io.decode_png`` would expand the palette to RGB colours; Pillow keeps
  the indices, which are the class ids.
  """
  try:
    with PIL.Image.open(io.BytesIO(data)) as img:
      mode = img.mode
      mask = np.asarray(img)
      if mode == "P":
        voc.check_mask_palette(where, img, mask)
  except (OSError, ValueError) as e:
    if isinstance(e, DatasetError):
      raise
    raise DatasetError(f"{where}: cannot decode PNG mask: {e}") from e
  if mode not in ("P", "L"):
    raise DatasetError(f"{where}: expected a palette ('P') or grayscale ('L') "
                       f"PNG of class ids, got mode {mode!r}")
  return check_labels(mask, where)


def decode_sbd_mat(data: bytes, where: str) -> np.ndarray:
  """Reads ``GTcls.Segmentation`` from an SBD ``cls/*.mat`` file, validated."""
  try:
    mask = scipy.io.loadmat(io.BytesIO(data))["GTcls"][0]["Segmentation"][0]
  # loadmat raises a grab bag of types on bad input; all mean "not a mask".
  except Exception as e:  # pylint: disable=broad-except
    raise DatasetError(f"{where}: not an SBD class mask "
                       f"(GTcls.Segmentation): {e!r}") from e
  return check_labels(np.asarray(mask), where)


def _encode_png(mask: np.ndarray) -> bytes:
  buf = io.BytesIO()
  PIL.Image.fromarray(mask, mode="L").save(buf, format="PNG")
  return buf.getvalue()


def index_archive(members: Iterable[Tuple[str, io.BufferedIOBase]],
                  archive: str, sbd: bool = False):
  """One streaming pass over an archive: split lists and masks.

  Args:
    members: ``(path, file)`` pairs, as from ``dl_manager.iter_archive``.
    archive: archive path, for error messages.
    sbd: the archive is SBD's ``benchmark.tgz`` rather than the VOC tar.

  Returns:
    ``(splits, masks)``: ``{split: frozenset(ids)}`` and a ``MaskIndex``.
    VOC PNGs are kept as they are (validated when generated); SBD masks are
    validated here and re-encoded as PNG, far smaller than ``.mat`` or arrays.
  """
  split_re, mask_re = ((_SBD_SPLIT_RE, _SBD_MASK_RE) if sbd
                       else (_VOC_SPLIT_RE, _VOC_MASK_RE))
  splits, masks = {}, {}
  for path, f in members:
    if m := split_re.search(path):
      splits[m.group(1)] = frozenset(
          line.split()[0] for line in f.read().decode().splitlines()
          if line.strip())
    elif m := mask_re.search(path):
      where = f"{archive}:{path}"
      masks[m.group(1)] = (where, _encode_png(decode_sbd_mat(f.read(), where))
                           if sbd else f.read())
  for split in ("train", "val"):
    if split not in splits:
      expected = ("dataset/" if sbd else "VOC2012/ImageSets/Segmentation/")
      raise DatasetError(f"{archive}: no {expected}{split}.txt; is this "
                         f"{SBD_TGZ if sbd else VOC_TAR}?")
  return splits, masks


def _make_example(image_id: str, jpeg: bytes, image_where: str,
                  mask_where: str, mask_png: bytes) -> dict:
  mask = decode_png_mask(mask_png, mask_where)
  try:
    with PIL.Image.open(io.BytesIO(jpeg)) as img:
      width, height = img.size
      # Keep the original JPEG bytes (no re-encoding loss) when already RGB.
      image = jpeg if img.mode == "RGB" else np.asarray(img.convert("RGB"))
  except (OSError, ValueError) as e:
    raise DatasetError(f"{image_where}: cannot decode JPEG: {e}") from e
  if mask.shape != (height, width):
    raise DatasetError(f"{mask_where}: mask shape {mask.shape} does not match "
                       f"image {image_where} of shape {(height, width)}")
  return {"image": image, "segmentation": mask[..., None],
          "file_name": f"{image_id}.jpg", "id": image_id}


class VocSegmentation(tfds.core.GeneratorBasedBuilder):
  """PASCAL VOC 2012 semantic segmentation, optionally with SBD train_aug."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(
          name="2012", description="VOC 2012 train (1,464) and val (1,449)."),
      tfds.core.BuilderConfig(
          name="2012_aug",
          description="VOC 2012 train/val plus SBD-augmented train_aug "
                      "(10,582 = SBD train+val + VOC train - VOC val)."),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "2012"
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Optional: without these files the builder downloads them.
  Place in `manual_dir` (default `<data_dir>/downloads/manual/`):
    * {VOC_TAR} from {URLS[VOC_TAR]}
    * {SBD_TGZ} (config 2012_aug only) from {URLS[SBD_TGZ]}
      (see http://home.bharathh.info/pubs/codes/SBD/download.html)
  Keep the archives as they are; they are streamed, not extracted.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "PASCAL VOC 2012 semantic segmentation: class ids 0..20 "
            "(background + 20 objects), 255 = void. Config 2012_aug adds the "
            "SBD (Hariharan et al. 2011) augmented training set train_aug."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3),
                                         encoding_format="jpeg"),
            "segmentation": tfds.features.Image(shape=(None, None, 1),
                                                encoding_format="png"),
            "file_name": tfds.features.Text(),
            "id": tfds.features.Text(),
        }),
        supervised_keys=("image", "segmentation"),
        homepage="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/",
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    voc = _archive_path(dl_manager, VOC_TAR)
    splits, masks = index_archive(dl_manager.iter_archive(_stream(voc)),
                                  str(voc))
    split_ids = {"train": splits["train"], "val": splits["val"]}
    if self.builder_config.name == "2012_aug":
      sbd = _archive_path(dl_manager, SBD_TGZ)
      sbd_splits, sbd_masks = index_archive(
          dl_manager.iter_archive(_stream(sbd)), str(sbd), sbd=True)
      split_ids["train_aug"] = (sbd_splits["train"] | sbd_splits["val"]
                                | splits["train"]) - splits["val"]
    split_masks = {"train": masks, "val": masks}
    if "train_aug" in split_ids:
      split_masks["train_aug"] = {**masks, **sbd_masks}  # SBD's win.
    for split, ids in split_ids.items():
      if missing := sorted(ids - split_masks[split].keys()):
        raise DatasetError(f"{voc}: {len(missing)} ids of split {split!r} "
                           f"have no segmentation mask, e.g. {missing[:5]}")
    return {split: self._generate_examples(
        dl_manager.iter_archive(_stream(voc)), str(voc), ids,
        split_masks[split]) for split, ids in split_ids.items()}

  def _generate_examples(self, members, archive: str, ids: frozenset,
                         masks: MaskIndex) -> Iterator[Tuple[str, dict]]:
    """Streams the VOC tar; yields ``(id, example)`` for ``ids``."""
    remaining = set(ids)
    for path, f in members:
      m = _VOC_IMAGE_RE.search(path)
      if m is None or m.group(1) not in remaining:
        continue
      image_id = m.group(1)
      remaining.remove(image_id)
      yield image_id, _make_example(image_id, f.read(), f"{archive}:{path}",
                                    *masks[image_id])
    if remaining:
      missing = sorted(remaining)
      raise DatasetError(f"{archive}: {len(missing)} split ids have no "
                         f"JPEGImages/<id>.jpg, e.g. {missing[:5]}")


def _archive_path(dl_manager: tfds.download.DownloadManager,
                  filename: str) -> epath.Path:
  """The archive in ``manual_dir`` when it is there, else its download."""
  try:
    manual_dir = dl_manager.manual_dir
  except (AssertionError, ValueError):  # TFDS: manual dir unset or empty.
    manual_dir = None
  if manual_dir is not None and (epath.Path(manual_dir) / filename).exists():
    return epath.Path(manual_dir) / filename
  return epath.Path(dl_manager.download(URLS[filename]))


def _stream(path: epath.Path) -> tfds.download.Resource:
  # Stream mode ('r|*') reads front to back without a member table, and
  # detects gzip itself, so it serves both the .tar and the .tgz.
  return tfds.download.Resource(
      path=path, extract_method=tfds.download.ExtractMethod.TAR_STREAM)


def main(argv: Optional[list] = None) -> VocSegmentation:
  """Command line: download (or read from manual_dir) and prepare the data.

  Args:
    argv: arguments without the program name; ``None`` reads ``sys.argv``.

  Returns:
    The prepared builder.
  """
  parser = argparse.ArgumentParser(
      description="Prepare the voc_segmentation TFDS dataset.")
  parser.add_argument("--data_dir", default=None,
                      help="TFDS data dir (default: TFDS's default).")
  parser.add_argument("--manual_dir", default=None,
                      help=f"Dir holding {VOC_TAR} (and {SBD_TGZ}); archives "
                           "not found there are downloaded.")
  parser.add_argument("--config", default="2012",
                      choices=[c.name for c in VocSegmentation.BUILDER_CONFIGS])
  args = parser.parse_args(argv)
  builder = VocSegmentation(config=args.config, data_dir=args.data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=args.manual_dir))
  for name, split in builder.info.splits.items():
    print(f"{builder.info.full_name} {name}: {split.num_examples} examples")
  return builder


if __name__ == "__main__":
  main()
