"""tf.data input pipelines for training and evaluation, sharded per process.

Training (:func:`train_dataset`) is an infinite stream that is a pure function
of ``(seed, step)``:

* the *global example stream* is the concatenation of epoch permutations
  ``np.random.default_rng([seed, epoch]).permutation(N)``;
* global step ``k`` consumes stream positions ``[k*G, (k+1)*G)`` (``G`` the
  global batch size) and process ``p`` of ``P`` takes rows
  ``[p*G/P, (p+1)*G/P)`` of that batch;
* the augmentation of the example at stream position ``j`` is seeded by
  ``(seed, j)``.

So resuming at step ``s`` (``start_step=s``) computes epochs and offsets
directly and reads nothing it skips, and any process count sees the same
global batches.

Evaluation (:func:`eval_dataset`) is finite: whole images padded to one fixed
size, the last global batch filled with dummy examples flagged
``valid=False``.

Decoding runs :func:`flaxseg.data.voc.load_example` through
``tf.numpy_function``, so a bad file surfaces as an error whose text contains
the :class:`~flaxseg.data.voc.DatasetError` message with the file name.
With ``on_bad_example='skip'`` such an example is recorded in a
:class:`BadExamples` instead: training takes the next readable record of the
list in its place (the same one on every run, so the stream stays a function
of ``(seed, step)`` and of which files are bad); evaluation leaves the slot
empty (all pixels ignored, ``valid=False``), so it counts for nothing.
"""

from __future__ import annotations

import functools
import math
import threading
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from flaxseg.data import transforms
from flaxseg.data import voc

try:
  # The accelerators belong to JAX; TF only feeds it from the host.
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF devices were already initialised elsewhere.
  pass

IMAGENET_MEAN = transforms.IMAGENET_MEAN
IMAGENET_STD = transforms.IMAGENET_STD
AUTOTUNE = tf.data.AUTOTUNE


#: ``on_bad_example`` values.
BAD_EXAMPLE_MODES = ("raise", "skip")


class BadExamples:
  """The examples a pipeline skipped, with the error each one gave.

  Decoding threads add to it; the trainer reads what is new at each log step.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self.errors: dict[str, str] = {}     # record id -> DatasetError message
    self._new: list[str] = []

  def add(self, record: voc.Record, error: Exception) -> None:
    with self._lock:
      if record.id not in self.errors:
        self.errors[record.id] = str(error)
        self._new.append(str(error))

  def __contains__(self, record_id: str) -> bool:
    with self._lock:
      return record_id in self.errors

  def __len__(self) -> int:
    with self._lock:
      return len(self.errors)

  def take_new(self) -> list[str]:
    """Messages of the examples skipped since the last call."""
    with self._lock:
      new, self._new = self._new, []
    return new


def _bad_example_mode(on_bad_example: str, bad_examples):
  if on_bad_example not in BAD_EXAMPLE_MODES:
    raise ValueError(f"on_bad_example={on_bad_example!r}: expected one of "
                     f"{BAD_EXAMPLE_MODES} (config.data.on_bad_example)")
  if on_bad_example == "skip" and bad_examples is None:
    bad_examples = BadExamples()
  return on_bad_example == "skip", bad_examples


def _per_process_batch(global_batch_size: int, process_index: int,
                       process_count: int) -> int:
  if global_batch_size < 1 or process_count < 1:
    raise ValueError(f"global_batch_size ({global_batch_size}) and "
                     f"process_count ({process_count}) must be positive")
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} is not divisible "
                     f"by process_count {process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in "
                     f"[0, {process_count})")
  return global_batch_size // process_count


class _EpochOrder:
  """Maps global stream positions to record indices (epoch permutations)."""

  def __init__(self, num_examples: int, seed: int):
    self.num_examples = num_examples
    self.seed = seed
    # Parallel decoders hit the same epoch or two; keep a few around.
    self.permutation = functools.lru_cache(maxsize=4)(self._permutation)

  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(
        self.num_examples)

  def __call__(self, position: int) -> int:
    epoch, offset = divmod(int(position), self.num_examples)
    return int(self.permutation(epoch)[offset])


def example_indices(num_examples: int, seed: int, positions) -> np.ndarray:
  """Record indices at the given global stream positions (for tests/tools).

  Args:
    num_examples: number of records ``N``.
    seed: the run seed.
    positions: iterable of non-negative stream positions.

  Returns:
    int64 array of record indices.
  """
  order = _EpochOrder(num_examples, seed)
  return np.array([order(p) for p in positions], np.int64)


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  return options


def train_dataset(records: Sequence[voc.Record], *, num_classes: int,
                  global_batch_size: int, crop_size: Sequence[int], seed: int,
                  start_step: int = 0, process_index: int = 0,
                  process_count: int = 1,
                  scale_range: Sequence[float] = (0.5, 2.0), flip: bool = True,
                  mean: Sequence[float] = IMAGENET_MEAN,
                  std: Sequence[float] = IMAGENET_STD,
                  num_parallel_calls: int = AUTOTUNE,
                  prefetch: int = AUTOTUNE, on_bad_example: str = "raise",
                  bad_examples: Optional[BadExamples] = None
                  ) -> tf.data.Dataset:
  """The infinite, deterministic training stream of this process.

  Args:
    records: the training examples.
    num_classes: for mask validation.
    global_batch_size: ``G``, the batch size summed over processes.
    crop_size: ``(height, width)`` of the training crops.
    seed: non-negative run seed; batches are a function of (seed, step).
    start_step: first global step to produce (resume point).
    process_index: this process, ``p``.
    process_count: number of processes ``P``; must divide ``G``.
    scale_range: ``(min, max)`` random scale; ``(1, 1)`` disables it.
    flip: random horizontal flips.
    mean: normalisation mean, in [0, 1] units.
    std: normalisation standard deviation, in [0, 1] units.
    num_parallel_calls: parallelism of decoding and augmentation.
    prefetch: batches to prefetch.
    on_bad_example: ``'raise'`` (a file that cannot be read stops the stream
      with its :class:`~flaxseg.data.voc.DatasetError`) or ``'skip'`` (it is
      added to ``bad_examples`` and the next readable record in list order
      takes its place).
    bad_examples: where skipped examples are recorded (``'skip'``; default a
      new one, unseen by the caller).

  Returns:
    A ``tf.data.Dataset`` of dicts ``{'image': float32 [b, h, w, 3],
    'label': int32 [b, h, w]}`` with ``b = G // P``; 255 marks ignored pixels.
  """
  b = _per_process_batch(global_batch_size, process_index, process_count)
  if not records:
    raise voc.DatasetError("train_dataset got no records")
  if seed < 0 or start_step < 0:
    raise ValueError(f"seed ({seed}) and start_step ({start_step}) must be >= 0")
  records = list(records)
  order = _EpochOrder(len(records), seed)
  skip, bad_examples = _bad_example_mode(on_bad_example, bad_examples)

  def position(local):
    # Row `local` of this process's stream -> global stream position.
    step = start_step + local // b
    return step * global_batch_size + process_index * b + local % b

  def load(pos):
    i = order(pos)
    if not skip:
      return voc.load_example(records[i], num_classes)
    for k in range(len(records)):
      record = records[(i + k) % len(records)]
      if record.id in bad_examples:
        continue
      try:
        return voc.load_example(record, num_classes)
      except voc.DatasetError as e:
        bad_examples.add(record, e)
    raise voc.DatasetError(
        f"none of the {len(records)} training examples can be read; first "
        f"error: {next(iter(bad_examples.errors.values()))}")

  def decode(pos):
    image, label = tf.numpy_function(load, [pos], [tf.uint8, tf.uint8],
                                     stateful=False)
    image.set_shape([None, None, 3])
    label.set_shape([None, None])
    return pos, image, label

  def augment(pos, image, label):
    aug_seed = tf.stack([tf.constant(seed, tf.int64), pos])
    image, label = transforms.train_augment(
        image, label, aug_seed, crop_size=crop_size, scale_range=scale_range,
        flip=flip, mean=mean, std=std)
    return {"image": image, "label": label}

  ds = tf.data.Dataset.counter(0, dtype=tf.int64).map(position)
  ds = ds.map(decode, num_parallel_calls=num_parallel_calls, deterministic=True)
  ds = ds.map(augment, num_parallel_calls=num_parallel_calls, deterministic=True)
  ds = ds.batch(b, drop_remainder=True)
  return ds.prefetch(prefetch).with_options(_options())


def num_eval_steps(num_examples: int, global_batch_size: int) -> int:
  """Global batches in one pass of :func:`eval_dataset` (last one padded).

  Args:
    num_examples: number of records.
    global_batch_size: batch size summed over processes.

  Returns:
    ``ceil(num_examples / global_batch_size)``.
  """
  return -(-num_examples // global_batch_size)


def train_steps_for_epochs(num_examples: int, global_batch_size: int,
                           epochs: float) -> int:
  """Steps needed to see ``epochs`` passes over the training set.

  Args:
    num_examples: number of training records.
    global_batch_size: batch size summed over processes.
    epochs: number of (possibly fractional) epochs.

  Returns:
    ``ceil(epochs * num_examples / global_batch_size)``.
  """
  return int(math.ceil(epochs * num_examples / global_batch_size))


def eval_dataset(records: Sequence[voc.Record], *, num_classes: int,
                 global_batch_size: int, pad_to: Sequence[int],
                 process_index: int = 0, process_count: int = 1,
                 mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD,
                 num_parallel_calls: int = AUTOTUNE,
                 prefetch: int = AUTOTUNE, on_bad_example: str = "raise",
                 bad_examples: Optional[BadExamples] = None
                 ) -> tf.data.Dataset:
  """One finite pass over whole images, padded to a fixed size.

  The records are padded with dummy examples to a multiple of
  ``global_batch_size``; global batch ``k`` holds records
  ``[k*G, (k+1)*G)`` and process ``p`` takes rows ``[p*G/P, (p+1)*G/P)``, so
  over all processes every record appears exactly once.

  Args:
    records: the evaluation examples.
    num_classes: for mask validation.
    global_batch_size: ``G``, the batch size summed over processes.
    pad_to: ``(H, W)``; images are padded bottom/right to it (image with the
      mean colour, i.e. 0 after normalisation; label with 255). A larger image
      is an error (VOC images are at most 500x500).
    process_index: this process, ``p``.
    process_count: number of processes ``P``; must divide ``G``.
    mean: normalisation mean, in [0, 1] units.
    std: normalisation standard deviation, in [0, 1] units.
    num_parallel_calls: decoding parallelism.
    prefetch: batches to prefetch.
    on_bad_example: ``'raise'``, or ``'skip'``: an unreadable example is
      added to ``bad_examples`` and its slot left empty (``valid=False``,
      size 0, every pixel ignored).
    bad_examples: where skipped examples are recorded.

  Returns:
    A ``tf.data.Dataset`` of ``num_eval_steps(len(records), G)`` dicts:
    ``'image'`` float32 [b, H, W, 3], ``'label'`` int32 [b, H, W],
    ``'valid'`` bool [b], ``'height'``/``'width'`` int32 [b] (original size,
    0 for dummies and skipped examples), ``'index'`` int32 [b] (position in ``records``, -1 for
    dummies), with ``b = G // P``.
  """
  b = _per_process_batch(global_batch_size, process_index, process_count)
  if not records:
    raise voc.DatasetError("eval_dataset got no records")
  records = list(records)
  n = len(records)
  pad_h, pad_w = int(pad_to[0]), int(pad_to[1])
  steps = num_eval_steps(n, global_batch_size)
  skip, bad_examples = _bad_example_mode(on_bad_example, bad_examples)
  empty = np.zeros((0, 0, 3), np.uint8), np.zeros((0, 0), np.uint8)

  def index(local):
    j = (local // b) * global_batch_size + process_index * b + local % b
    return tf.where(j < n, j, -1)

  def load(i):
    if i < 0:
      return empty
    record = records[int(i)]
    try:
      image, label = voc.load_example(record, num_classes)
    except voc.DatasetError as e:
      if not skip:
        raise
      bad_examples.add(record, e)
      return empty
    if image.shape[0] > pad_h or image.shape[1] > pad_w:
      raise voc.DatasetError(
          f"image {record.image_path!r} is {image.shape[0]}x{image.shape[1]}, "
          f"larger than the eval pad size {pad_h}x{pad_w}")
    return image, label

  def decode(i):
    image, label = tf.numpy_function(load, [i], [tf.uint8, tf.uint8],
                                     stateful=False)
    image.set_shape([None, None, 3])
    label.set_shape([None, None])
    height, width = tf.shape(label)[0], tf.shape(label)[1]
    # Normalise before padding so the padding is exactly 0.
    image, label = transforms.pad_to_at_least(
        transforms.normalize(image, mean, std), label, (pad_h, pad_w),
        image_fill=0.0)
    image.set_shape([pad_h, pad_w, 3])
    label.set_shape([pad_h, pad_w])
    return {"image": image, "label": tf.cast(label, tf.int32),
            "valid": (i >= 0) & (height > 0), "height": height,
            "width": width,
            "index": tf.cast(i, tf.int32)}

  ds = tf.data.Dataset.range(steps * b).map(index)
  ds = ds.map(decode, num_parallel_calls=num_parallel_calls, deterministic=True)
  ds = ds.batch(b, drop_remainder=True)
  return ds.prefetch(prefetch).with_options(_options())
