"""Shared pytest fixtures: tiny synthetic VOC / SBD trees, generated once.

Session-scoped trees are shared by every test, so tests must not modify them;
a test that corrupts files takes ``voc_copy`` (a private copy per test).

Fixtures:
  voc_root: VOC2012 directory of a plain VOC tree (8 train, 4 val images).
  sbd_tree: a :class:`SyntheticTree` with VOC + SBD (no SegmentationClassAug).
  sbd_aug_tree: a :class:`SyntheticTree` with VOC + SBD + SegmentationClassAug.
  voc_copy: VOC2012 directory of a fresh, writable copy of the ``voc_root`` tree.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import sys
import tempfile

# Recipes in configs/ import ``configs.common``, and the tests import their
# helpers as ``tests.<module>``; train.py has the repository root on sys.path
# as its own directory, the tests put it there explicitly.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

# One persistent JAX compilation cache for the whole run, set before anything
# imports JAX. The xdist workers and every ``train.py``/bench subprocess the
# tests start inherit the variable, so a program compiled once (the tiny
# training step, restarted after each SIGKILL or preemption; the same tiny
# model built by several tests) is loaded instead of compiled again. The
# process that creates the directory removes it at exit; a cache directory
# the caller set is used as is. ``FLAXSEG_TEST_COMPILE_CACHE=0`` turns it off.
if (os.environ.get("FLAXSEG_TEST_COMPILE_CACHE", "1") != "0"
    and "JAX_COMPILATION_CACHE_DIR" not in os.environ):
  _CACHE_DIR = tempfile.mkdtemp(prefix="flaxseg-test-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
  atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)

# Compile without LLVM's optimisation passes (XLA's HLO passes, fusion
# included, still run; only the generated loops are slower): the suite is
# mostly compile time at tiny sizes, and this took the in-process tests among
# the 60 slowest from 1305 to 1021 s. Appended to XLA_FLAGS so subprocesses
# inherit it (the 8-device CRF-RNN training runs, mostly run time, take it
# out again); ``FLAXSEG_TEST_FAST_COMPILE=0`` compiles as users do.
if os.environ.get("FLAXSEG_TEST_FAST_COMPILE", "1") != "0":
  from tests import xla_env  # pylint: disable=g-import-not-at-top  (no JAX)
  _FLAGS = xla_env.with_fast_compile(os.environ)
  if _FLAGS is not None:        # None: the caller chose a level
    os.environ["XLA_FLAGS"] = _FLAGS

# Importing torchvision after tensorflow kills the process with a
# segmentation fault here (tensorflow 2.21, torch 2.14, torchvision 0.29; the
# other order works). The whole suite only got the safe order because
# collecting tests/convert/test_parity.py imports torchvision before any test
# runs; running a file that needs torchvision after one that ran the tf.data
# pipeline (`pytest tests/train/test_loop.py tests/bench/test_bench_perf.py`)
# crashed. So import it first, where the parity extra is installed.
try:
  import torchvision  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import,wrong-import-position
except ImportError:
  pass

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from flaxseg.data import synthetic  # pylint: disable=g-import-not-at-top,wrong-import-position

#: Sizes of the shared trees; small so each generates in well under a second.
NUM_TRAIN = 8
NUM_VAL = 4
NUM_SBD_EXTRA = 4
IMAGE_SIZE = (40, 72)
NUM_CLASSES = synthetic.NUM_SYNTH_CLASSES


@dataclasses.dataclass(frozen=True)
class SyntheticTree:
  """Paths and sizes of a generated tree."""
  root: str          # Parent of VOCdevkit/ and benchmark_RELEASE/.
  voc_root: str      # .../VOCdevkit/VOC2012
  sbd_root: str      # .../benchmark_RELEASE/dataset
  num_train: int
  num_val: int
  num_sbd_extra: int
  num_classes: int


def _make_tree(root, **kwargs) -> SyntheticTree:
  voc_root = synthetic.generate_voc_tree(
      str(root), num_train=NUM_TRAIN, num_val=NUM_VAL, seed=0,
      image_size=IMAGE_SIZE, num_sbd_extra=NUM_SBD_EXTRA, **kwargs)
  return SyntheticTree(str(root), voc_root,
                       os.path.join(str(root), synthetic.SBD_SUBDIR),
                       NUM_TRAIN, NUM_VAL, NUM_SBD_EXTRA, NUM_CLASSES)


@pytest.fixture(scope="session")
def voc_tree(tmp_path_factory) -> SyntheticTree:
  """A plain VOC tree (no SBD)."""
  return _make_tree(tmp_path_factory.mktemp("voc"))


@pytest.fixture(scope="session")
def voc_root(voc_tree) -> str:
  """The VOC2012 directory of the shared plain VOC tree (read-only)."""
  return voc_tree.voc_root


@pytest.fixture(scope="session")
def sbd_tree(tmp_path_factory) -> SyntheticTree:
  """VOC + SBD, labels for train_aug from SBD .mat files."""
  return _make_tree(tmp_path_factory.mktemp("voc_sbd"), with_sbd=True)


@pytest.fixture(scope="session")
def sbd_aug_tree(tmp_path_factory) -> SyntheticTree:
  """VOC + SBD + SegmentationClassAug."""
  return _make_tree(tmp_path_factory.mktemp("voc_sbd_aug"), with_sbd=True,
                    with_aug=True)


@pytest.fixture
def voc_copy(voc_tree, tmp_path) -> str:
  """VOC2012 directory of a private, writable copy of the plain VOC tree."""
  shutil.copytree(voc_tree.root, tmp_path / "copy")
  return os.path.join(str(tmp_path / "copy"), "VOCdevkit", "VOC2012")


