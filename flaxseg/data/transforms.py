"""Joint image/label transforms as small TensorFlow graph functions.

Each function takes an image and its label map and returns both, transformed
consistently. Randomness comes only from stateless ops seeded by a ``seed``
tensor of shape [2]: the augmentation of an example is then a pure function of
its seed, which the pipeline derives from (run seed, position in the example
stream). That is what makes a resumed run see exactly the same crops and flips.

Conventions: images are float32 in [0, 255] (uint8 inputs are cast) until
:func:`normalize`; labels are integer (H, W) maps with ``IGNORE_LABEL`` (255)
for void, and are never interpolated (nearest-neighbour only), so a label only
ever holds values that were in the input, or 255 where padding was added.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from flaxseg.data.voc import IGNORE_LABEL
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def split_seed(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
  """Derives ``num`` independent [2]-shaped seeds from one.

  Args:
    seed: int32/int64 tensor of shape [2].
    num: how many seeds to derive.

  Returns:
    A list of ``num`` int64 tensors of shape [2].
  """
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num)
  return [seeds[i] for i in range(num)]


def random_scale(image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor,
                 scale_range: Sequence[float] = (0.5, 2.0)
                 ) -> tuple[tf.Tensor, tf.Tensor]:
  """Resizes image and label by one factor drawn uniformly from a range.

  Args:
    image: (H, W, 3) image, any real dtype.
    label: (H, W) integer label map.
    seed: [2] seed tensor.
    scale_range: ``(min, max)`` scale factor.

  Returns:
    ``(image, label)``: float32 (h, w, 3) resized bilinearly and the label
    resized with nearest neighbour (same dtype), ``h = round(H * s)``.
  """
  lo, hi = float(scale_range[0]), float(scale_range[1])
  image = tf.cast(image, tf.float32)
  if lo == hi == 1.0:
    return image, label
  scale = tf.random.stateless_uniform([], seed, lo, hi)
  size = tf.cast(tf.shape(image)[:2], tf.float32)
  new_size = tf.maximum(tf.cast(tf.round(size * scale), tf.int32), 1)
  image = tf.image.resize(image, new_size, method="bilinear")
  # Nearest keeps class ids intact; any interpolation would invent classes.
  label = tf.image.resize(label[..., None], new_size, method="nearest")[..., 0]
  return image, label


def pad_to_at_least(image: tf.Tensor, label: tf.Tensor, size: Sequence[int],
                    image_fill: Sequence[float] | float = 0.0,
                    label_fill: int = IGNORE_LABEL
                    ) -> tuple[tf.Tensor, tf.Tensor]:
  """Pads bottom and right so that both sides are at least ``size``.

  Args:
    image: (H, W, C) image.
    label: (H, W) label map.
    size: ``(height, width)`` minimum size.
    image_fill: per-channel fill value (or one scalar). Pad an unnormalised
      image with ``255 * mean`` so padding becomes 0 after :func:`normalize`.
    label_fill: label fill, by default the ignore label so the loss skips it.

  Returns:
    ``(image, label)`` of size ``(max(H, height), max(W, width))``.
  """
  shape = tf.shape(image)
  pad_h = tf.maximum(size[0] - shape[0], 0)
  pad_w = tf.maximum(size[1] - shape[1], 0)
  paddings = [[0, pad_h], [0, pad_w]]
  fill = tf.cast(tf.broadcast_to(image_fill, [image.shape[-1]]), image.dtype)
  # tf.pad takes a single scalar fill, so each channel is padded on its own.
  channels = [tf.pad(image[..., c], paddings, constant_values=fill[c])
              for c in range(image.shape[-1])]
  image = tf.stack(channels, axis=-1)
  label = tf.pad(label, paddings, constant_values=tf.cast(label_fill, label.dtype))
  return image, label


def random_crop(image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor,
                size: Sequence[int]) -> tuple[tf.Tensor, tf.Tensor]:
  """Crops the same random window from image and label.

  Args:
    image: (H, W, C) image with ``H >= size[0]`` and ``W >= size[1]`` (see
      :func:`pad_to_at_least`).
    label: (H, W) label map.
    seed: [2] seed tensor.
    size: ``(height, width)`` of the crop.

  Returns:
    ``(image, label)`` with static shapes ``(height, width, C)`` and
    ``(height, width)``.
  """
  ch, cw = int(size[0]), int(size[1])
  shape = tf.shape(image)
  seed_y, seed_x = split_seed(seed, 2)
  y = tf.random.stateless_uniform([], seed_y, 0, shape[0] - ch + 1, tf.int32)
  x = tf.random.stateless_uniform([], seed_x, 0, shape[1] - cw + 1, tf.int32)
  image = image[y:y + ch, x:x + cw]
  label = label[y:y + ch, x:x + cw]
  image.set_shape([ch, cw, image.shape[-1]])
  label.set_shape([ch, cw])
  return image, label


def random_flip(image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor,
                probability: float = 0.5) -> tuple[tf.Tensor, tf.Tensor]:
  """Flips image and label left-right together with the given probability.

  Args:
    image: (H, W, C) image.
    label: (H, W) label map.
    seed: [2] seed tensor.
    probability: chance of flipping.

  Returns:
    ``(image, label)``, both flipped or both unchanged.
  """
  flip = tf.random.stateless_uniform([], seed) < probability
  image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
  label = tf.cond(flip, lambda: tf.reverse(label, [1]), lambda: label)
  return image, label


def normalize(image: tf.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> tf.Tensor:
  """Maps [0, 255] pixels to ``(x / 255 - mean) / std``.

  Args:
    image: (..., 3) image with values in [0, 255].
    mean: per-channel mean, in [0, 1] units.
    std: per-channel standard deviation, in [0, 1] units.

  Returns:
    float32 image.
  """
  mean = tf.constant(mean, tf.float32)
  std = tf.constant(std, tf.float32)
  return (tf.cast(image, tf.float32) / 255.0 - mean) / std


def train_augment(image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor, *,
                  crop_size: Sequence[int],
                  scale_range: Sequence[float] = (0.5, 2.0), flip: bool = True,
                  mean: Sequence[float] = IMAGENET_MEAN,
                  std: Sequence[float] = IMAGENET_STD
                  ) -> tuple[tf.Tensor, tf.Tensor]:
  """The standard segmentation training augmentation.

  Random scale, pad to the crop size (mean colour / ignore label), random
  crop, random horizontal flip, normalisation. Normalising last costs one crop
  rather than a (possibly 2x upscaled) whole image.

  Args:
    image: (H, W, 3) uint8 or float image in [0, 255].
    label: (H, W) integer label map.
    seed: [2] seed tensor; the result is a pure function of it and the input.
    crop_size: ``(height, width)`` of the output.
    scale_range: ``(min, max)`` scale; ``(1, 1)`` disables scaling.
    flip: whether to flip left-right with probability 1/2.
    mean: per-channel mean, in [0, 1] units.
    std: per-channel standard deviation, in [0, 1] units.

  Returns:
    ``(image, label)``: float32 (h, w, 3) normalised and int32 (h, w).
  """
  seed_scale, seed_crop, seed_flip = split_seed(seed, 3)
  image, label = random_scale(image, label, seed_scale, scale_range)
  image, label = pad_to_at_least(image, label, crop_size,
                                 image_fill=[255.0 * m for m in mean])
  image, label = random_crop(image, label, seed_crop, crop_size)
  if flip:
    image, label = random_flip(image, label, seed_flip)
  return normalize(image, mean, std), tf.cast(label, tf.int32)
