"""Inference modes: single scale, multi-scale + flip, sliding window, CRF.

One pure function, :func:`segment_logits`, turns a batch of normalised images
into logits at input resolution under any combination of

* **multi-scale inputs** (``scales``): the batch is resized by each scale, the
  network's logits are resized back to the input size and averaged
  (DeepLab v3 sec. 4.1 evaluates at scales {0.5, 0.75, 1.0, 1.25, 1.5, 1.75}).
  ``merge='probs'`` averages softmax probabilities, as the TF DeepLab code's
  ``predict_labels_multi_scale`` and mmsegmentation's ``SegTTAModel`` do;
  ``merge='logits'`` averages the logits themselves;
* **left/right flip** (``flip``): each scale also runs on the mirrored batch,
  whose logits are mirrored back before averaging;
* **sliding window** (``window``): each (scaled) input is covered by crops of
  the window size placed every ``stride`` pixels, the last one flush with the
  border (mmsegmentation's ``slide_inference``); overlapping logits are
  averaged. An input no larger than the window runs whole.

With one scale of 1.0, no flip and no window (or a window covering the input)
the network's own logits come back untouched, so every mode agrees exactly
with plain inference where it should. :func:`crf_refine` then optionally
applies DeepLab v1/v2's dense-CRF post-processing to the result.

Everything here is traceable (``jit``, ``pmap``, ``shard_map``) and has no
trainer dependency: the trainer's eval step, ``python -m flaxseg.predict`` and
``python -m flaxseg.export`` all call these functions, so they give the same
predictions for the same inputs.
"""

from __future__ import annotations

import dataclasses
import fractions
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from flaxseg.config import IMAGENET_MEAN, IMAGENET_STD
from flaxseg.crf import meanfield
from flaxseg.models.layers import resize_bilinear

#: The keys of a CRF settings mapping (``config.eval.crf`` without
#: ``enabled``); see :func:`crf_refine`.
CRF_KEYS = ('num_iterations', 'backend', 'bi_w', 'bi_xy_std', 'bi_rgb_std',
            'pos_w', 'pos_xy_std')

MERGES = ('logits', 'probs')

ApplyFn = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class Settings:
  """How :func:`segment_logits` runs the network (hashable, static under jit).

  Attributes:
    scales: input scales; logits of every scale are resized to the input size.
    flip: also run the left/right mirrored input at every scale.
    merge: ``'logits'`` (mean of logits) or ``'probs'`` (mean of softmax
      probabilities, returned as their log so an argmax or a CRF reads them
      as logits).
    window: sliding-window crop ``(h, w)``, or ``None`` for whole inputs.
    stride: window step ``(h, w)``; ``None`` means 2/3 of the window
      (mmsegmentation's 512 crop / 341 stride).
    align_corners: corner convention of the rescaling (the model's own: True
      for the TF DeepLab recipes, False for torchvision's).
  """
  scales: Tuple[float, ...] = (1.0,)
  flip: bool = False
  merge: str = 'probs'
  window: Optional[Tuple[int, int]] = None
  stride: Optional[Tuple[int, int]] = None
  align_corners: bool = False

  def __post_init__(self):
    errors = []
    if not self.scales or any(not s > 0 for s in self.scales):
      errors.append(f'scales={self.scales!r} must be positive numbers')
    if self.merge not in MERGES:
      errors.append(f'merge={self.merge!r} must be one of {MERGES}')
    for name in ('window', 'stride'):
      value = getattr(self, name)
      if value is not None and (len(value) != 2 or min(value) < 1):
        errors.append(f'{name}={value!r} must be two positive sizes')
    if errors:
      raise ValueError('inference settings: ' + '; '.join(errors))

  @property
  def is_plain(self) -> bool:
    """One scale of 1.0, no flip: the network's logits as they are."""
    return tuple(self.scales) == (1.0,) and not self.flip


def settings_from_config(eval_config, align_corners: bool = False) -> Settings:
  """:class:`Settings` from a ``config.eval`` section.

  Keys (all optional): ``scales`` (sequence), ``flip``, ``merge``, ``window``
  (``(h, w)`` or one int; 0 or ``(0, 0)``: off), ``window_stride`` (likewise;
  off: 2/3 of the window).
  """
  def pair(value):
    if not value or (not isinstance(value, (int, np.integer)) and
                     not any(value)):
      return None
    if isinstance(value, (int, np.integer)):
      return (int(value), int(value))
    return tuple(int(v) for v in value)

  try:
    return Settings(
        scales=tuple(float(s) for s in eval_config.get('scales', (1.0,))),
        flip=bool(eval_config.get('flip', False)),
        merge=str(eval_config.get('merge', 'probs')),
        window=pair(eval_config.get('window', 0)),
        stride=pair(eval_config.get('window_stride', 0)),
        align_corners=bool(align_corners))
  except ValueError as e:
    raise ValueError(f'config.eval: {e}') from e


def scaled_size(size: Sequence[Any], scale: float, align_corners: bool
                ) -> Tuple[Any, Any]:
  """The input size at ``scale``.

  ``floor((d - 1) * s) + 1`` with corner alignment (TF DeepLab's
  ``scale_dimension``, which keeps corner pixels on the same grid), else
  ``round(d * s)`` (halves up). The scale is taken as an exact fraction
  (``Fraction(s).limit_denominator(1000)``), so sizes are integer arithmetic
  and also work on the symbolic sizes of a shape-polymorphic export.
  """
  frac = fractions.Fraction(scale).limit_denominator(1000)
  p, q = frac.numerator, frac.denominator
  out = []
  for d in size:
    if align_corners:
      n = ((d - 1) * p) // q + 1
    else:
      n = (2 * d * p + q) // (2 * q)
    out.append(max(1, n) if isinstance(n, (int, np.integer)) else n)
  return tuple(out)


def window_grid(size: Sequence[int], window: Sequence[int],
                stride: Optional[Sequence[int]] = None
                ) -> Tuple[Tuple[Tuple[int, int], ...], Tuple[int, int]]:
  """Top-left corners of the sliding windows over an input, and the crop size.

  mmsegmentation's grid: ``max(H - h + sh - 1, 0) // sh + 1`` rows of windows
  every ``sh`` pixels, the last one moved back to end at the border; the same
  across. A window larger than the input is cut to the input.

  Args:
    size: input ``(H, W)``.
    window: crop ``(h, w)``.
    stride: step ``(sh, sw)``; ``None`` for 2/3 of the window.

  Returns:
    ``(corners, (ch, cw))``.
  """
  if stride is None:
    stride = tuple(max(1, (2 * int(w)) // 3) for w in window)
  H, W = (int(d) for d in size)
  ch, cw = min(int(window[0]), H), min(int(window[1]), W)
  sh, sw = (int(s) for s in stride)
  rows = max(H - ch + sh - 1, 0) // sh + 1
  cols = max(W - cw + sw - 1, 0) // sw + 1
  corners = tuple((min(i * sh, H - ch), min(j * sw, W - cw))
                  for i in range(rows) for j in range(cols))
  return corners, (ch, cw)


def window_counts(size: Sequence[int], corners, crop) -> np.ndarray:
  """``float32 [H, W]``: how many windows cover each pixel."""
  count = np.zeros(tuple(int(d) for d in size), np.float32)
  for y, x in corners:
    count[y:y + crop[0], x:x + crop[1]] += 1.0
  return count


def _network(apply_fn: ApplyFn, variables, images):
  logits = apply_fn(variables, images, train=False)[0]
  return jnp.asarray(logits, jnp.promote_types(logits.dtype, jnp.float32))


def sliding_logits(apply_fn: ApplyFn, variables, images: jax.Array,
                   window: Sequence[int],
                   stride: Optional[Sequence[int]] = None) -> jax.Array:
  """Logits of ``images`` from overlapping window crops, averaged.

  The windows run one after another under ``lax.scan`` (one compiled network
  call, memory of one crop batch).

  Args:
    apply_fn: the model's ``apply``.
    variables: its variables.
    images: ``[b, H, W, 3]``.
    window: crop ``(h, w)``.
    stride: step, or ``None`` (2/3 of the window).

  Returns:
    ``[b, H, W, L]`` logits (float32 or wider).
  """
  b, H, W, c = images.shape
  corners, (ch, cw) = window_grid((H, W), window, stride)
  if len(corners) == 1 and (ch, cw) == (H, W):
    return _network(apply_fn, variables, images)
  crop_shape = jax.ShapeDtypeStruct((b, ch, cw, c), images.dtype)
  out = jax.eval_shape(lambda x: _network(apply_fn, variables, x), crop_shape)
  num_labels, dtype = out.shape[-1], out.dtype

  def body(total, corner):
    y, x = corner[0], corner[1]
    crop = jax.lax.dynamic_slice(images, (0, y, x, 0), (b, ch, cw, c))
    logits = _network(apply_fn, variables, crop)
    here = jax.lax.dynamic_slice(total, (0, y, x, 0), (b, ch, cw, num_labels))
    return jax.lax.dynamic_update_slice(total, here + logits,
                                        (0, y, x, 0)), None

  total = jnp.zeros((b, H, W, num_labels), dtype)
  total, _ = jax.lax.scan(body, total, jnp.asarray(corners, jnp.int32))
  count = jnp.asarray(window_counts((H, W), corners, (ch, cw)), dtype)
  return total / count[None, :, :, None]


def segment_logits(apply_fn: ApplyFn, variables, images: jax.Array,
                   settings: Settings = Settings()) -> jax.Array:
  """Logits at input resolution under the inference ``settings``.

  Args:
    apply_fn: the model's ``apply`` (``(variables, images, train=False)`` ->
      ``(logits, aux)``).
    variables: its variables.
    images: ``[b, H, W, 3]`` normalised images.
    settings: scales, flip, merge, window.

  Returns:
    ``[b, H, W, L]`` logits (float32 or wider). With :attr:`Settings.is_plain`
    and no effective window, exactly the network's logits.
  """
  size = images.shape[1:3]

  def run(x):
    if settings.window is None:
      return _network(apply_fn, variables, x)
    return sliding_logits(apply_fn, variables, x, settings.window,
                          settings.stride)

  if settings.is_plain:
    return run(images)
  total = None
  for scale in settings.scales:
    if scale == 1.0:
      scaled = images
    else:
      scaled = resize_bilinear(images, scaled_size(size, scale,
                                                   settings.align_corners),
                               settings.align_corners)
    for flipped in ((False, True) if settings.flip else (False,)):
      x = scaled[:, :, ::-1] if flipped else scaled
      logits = run(x)
      if flipped:
        logits = logits[:, :, ::-1]
      logits = resize_bilinear(logits, size, settings.align_corners)
      term = (jax.nn.softmax(logits, axis=-1) if settings.merge == 'probs'
              else logits)
      total = term if total is None else total + term
  mean = total / (len(settings.scales) * (2 if settings.flip else 1))
  if settings.merge == 'probs':
    return jnp.log(jnp.maximum(mean, jnp.finfo(mean.dtype).tiny))
  return mean


# -- dense-CRF post-processing ------------------------------------------------
def denormalize(images, mean: Sequence[float], std: Sequence[float]):
  """Normalised images back to the 0..255 colours the CRF kernels expect.

  Inverts the pipeline's ``(x / 255 - mean) / std`` and rounds, so an image
  decoded from uint8 comes back exactly (padding becomes the mean colour).

  Args:
    images: ``[..., 3]`` normalised images.
    mean: normalisation mean, in [0, 1] units.
    std: normalisation standard deviation, in [0, 1] units.

  Returns:
    float32 colours in ``[0, 255]``.
  """
  images = jnp.asarray(images, jnp.float32)
  raw = (images * jnp.asarray(std, jnp.float32) +
         jnp.asarray(mean, jnp.float32)) * 255.0
  return jnp.clip(jnp.round(raw), 0.0, 255.0)


def image_mask(height, width, size: Sequence[int]) -> jax.Array:
  """``[b, H, W]`` bool, True on each image's unpadded (top-left) region.

  Args:
    height: ``[b]`` image heights (0 for dummy examples: all False).
    width: ``[b]`` image widths.
    size: the padded ``(H, W)``.

  Returns:
    The mask.
  """
  rows = jnp.arange(size[0])[None, :, None] < jnp.asarray(height)[:, None, None]
  cols = jnp.arange(size[1])[None, None, :] < jnp.asarray(width)[:, None, None]
  return rows & cols


def crf_refine(logits, images, mask, crf: Mapping[str, Any], *,
               mean: Sequence[float] = IMAGENET_MEAN,
               std: Sequence[float] = IMAGENET_STD) -> jax.Array:
  """Dense-CRF marginals of a batch, DeepLab's post-processing.

  The logits are the unary (``-U = log softmax(logits)`` up to a per-pixel
  constant, DeepLab's ``-log p``); the appearance kernel sees the
  denormalised image. ``num_iterations`` and ``backend`` are static; the
  weights and bandwidths may be traced (a parameter search compiles once).

  Args:
    logits: ``[b, H, W, L]`` float logits at image resolution.
    images: ``[b, H, W, 3]`` normalised images (the model's input).
    mask: ``[b, H, W]`` True on the unpadded pixels (:func:`image_mask`), or
      ``None`` (every pixel is real).
    crf: the keys of :data:`CRF_KEYS` (``config.eval.crf``): appearance
      kernel ``bi_w``, ``bi_xy_std`` (pixels), ``bi_rgb_std`` (0..255 units);
      smoothness kernel ``pos_w``, ``pos_xy_std``; ``num_iterations``;
      ``backend``.
    mean, std: the normalisation of ``images``.

  Returns:
    ``[b, H, W, L]`` float32 marginals (``softmax(logits)`` outside the mask).
  """
  missing = [k for k in CRF_KEYS if k not in crf]
  if missing:
    raise ValueError(f'CRF settings lack {missing}')
  return meanfield.dense_crf(
      jnp.asarray(logits, jnp.float32), denormalize(images, mean, std),
      num_iterations=int(crf['num_iterations']),
      smoothness=meanfield.GaussianKernel(sxy=crf['pos_xy_std'],
                                          weight=crf['pos_w']),
      appearance=meanfield.BilateralKernel(sxy=crf['bi_xy_std'],
                                           srgb=crf['bi_rgb_std'],
                                           weight=crf['bi_w']),
      backend=crf['backend'], mask=mask)
