"""Colour-coded label maps and prediction pictures (VOC palette)."""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from flaxseg.data.voc import IGNORE_LABEL, voc_palette


def colorize(label: np.ndarray, palette: Optional[np.ndarray] = None
             ) -> np.ndarray:
  """``uint8 [H, W]`` class ids -> ``uint8 [H, W, 3]`` colours (255: white)."""
  palette = voc_palette() if palette is None else palette
  colours = palette[np.asarray(label, np.int64) % 256]
  colours[np.asarray(label) == IGNORE_LABEL] = 255
  return colours


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.5
            ) -> np.ndarray:
  """Blends the colour-coded ``label`` over ``image``; background stays as is."""
  image = np.asarray(image, np.float32)
  colours = colorize(label).astype(np.float32)
  blend = (1 - alpha) * image + alpha * colours
  keep = (np.asarray(label) == 0) | (np.asarray(label) == IGNORE_LABEL)
  blend[keep] = image[keep]
  return np.clip(blend + 0.5, 0, 255).astype(np.uint8)


def denormalize(image: np.ndarray, mean: Sequence[float],
                std: Sequence[float]) -> np.ndarray:
  """Inverts ``(x / 255 - mean) / std`` back to ``uint8`` RGB."""
  x = (np.asarray(image, np.float32) * np.asarray(std) + np.asarray(mean))
  return np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)


def side_by_side(parts: Sequence[np.ndarray]) -> np.ndarray:
  """Equal-height uint8 RGB pictures left to right, 4 white pixels apart."""
  gap = np.full((parts[0].shape[0], 4, 3), 255, np.uint8)
  out = [parts[0]]
  for p in parts[1:]:
    out += [gap, p]
  return np.concatenate(out, axis=1)


def stack(pictures: Sequence[np.ndarray]) -> np.ndarray:
  """uint8 RGB pictures top to bottom, padded white to the widest, 4 apart."""
  width = max(p.shape[1] for p in pictures)
  rows = []
  for i, p in enumerate(pictures):
    if i:
      rows.append(np.full((4, width, 3), 255, np.uint8))
    pad = np.full((p.shape[0], width - p.shape[1], 3), 255, np.uint8)
    rows.append(np.concatenate([p, pad], axis=1))
  return np.concatenate(rows, axis=0)


def prediction_panel(image: np.ndarray, label: np.ndarray,
                     prediction: np.ndarray) -> np.ndarray:
  """Image | ground truth | prediction | overlay, side by side (uint8 RGB)."""
  return side_by_side([image, colorize(label), colorize(prediction),
                       overlay(image, prediction)])


def label_panel(image: np.ndarray, prediction: np.ndarray,
                alpha: float = 0.5) -> np.ndarray:
  """Image | prediction | overlay, side by side (uint8 RGB)."""
  return side_by_side([image, colorize(prediction),
                       overlay(image, prediction, alpha)])


def save_palette_png(path: str, label: np.ndarray,
                     class_names: Optional[Sequence[str]] = None) -> None:
  """Writes a label map as a VOC-style palette PNG (class ids = indices).

  Args:
    path: the file (its directory is created).
    label: ``[H, W]`` class ids (255: void).
    class_names: stored as JSON in the PNG's ``classes`` text chunk.
  """
  from PIL import PngImagePlugin  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  img = Image.fromarray(np.asarray(label, np.uint8), mode='P')
  img.putpalette(voc_palette().reshape(-1).tolist())
  info = None
  if class_names is not None:
    info = PngImagePlugin.PngInfo()
    info.add_text('classes', json.dumps(list(class_names)))
  img.save(path, pnginfo=info)


def save_rgb(path: str, image: np.ndarray) -> None:
  """Writes an RGB uint8 array as PNG, creating the directory."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  Image.fromarray(np.asarray(image, np.uint8)).save(path)


def confusion_picture(confusion: np.ndarray,
                      names: Optional[Sequence[str]] = None,
                      cell: int = 0) -> np.ndarray:
  """The confusion matrix as a heat map with class names (uint8 RGB).

  Rows are ground-truth classes, columns predictions; each row is normalised
  by its pixel count (so the diagonal is each class's recall, in percent,
  written in the cells when they are large enough). Rows without pixels are
  grey.

  Args:
    confusion: ``[C, C]`` counts, ``confusion[true, predicted]``.
    names: the class names (default: their indices).
    cell: cell size in pixels (0: 28, smaller for many classes).

  Returns:
    ``uint8 [H, W, 3]``.
  """
  from PIL import ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top
  cm = np.asarray(confusion, np.float64)
  c = cm.shape[0]
  names = [str(n) for n in (names if names is not None else range(c))]
  cell = cell or max(12, min(28, 640 // max(c, 1)))
  font = ImageFont.load_default()
  measure = ImageDraw.Draw(Image.new('RGB', (1, 1)))
  label_w = int(max(measure.textlength(n, font=font) for n in names)) + 8
  title = 'rows: ground truth, columns: prediction (% of row)'
  title_h = 16
  width = max(label_w + c * cell + 4,
              int(measure.textlength(title, font=font)) + 8)
  height = title_h + label_w + c * cell + 4
  canvas = Image.new('RGB', (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  draw.text((4, 2), title, fill=(0, 0, 0), font=font)
  totals = cm.sum(axis=1, keepdims=True)
  frac = np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0)
  x0, y0 = label_w, title_h + label_w
  for i in range(c):
    for j in range(c):
      if totals[i, 0] == 0:
        colour = (200, 200, 200)
      else:
        v = frac[i, j]    # white -> dark blue
        colour = (int(255 - 247 * v), int(255 - 207 * v), int(255 - 148 * v))
      box = (x0 + j * cell, y0 + i * cell, x0 + (j + 1) * cell - 1,
             y0 + (i + 1) * cell - 1)
      draw.rectangle(box, fill=colour)
      if cell >= 20 and totals[i, 0] > 0 and frac[i, j] >= 0.005:
        text = f'{100 * frac[i, j]:.0f}'
        ink = (255, 255, 255) if frac[i, j] > 0.5 else (0, 0, 0)
        tw = measure.textlength(text, font=font)
        draw.text((box[0] + (cell - tw) / 2, box[1] + cell / 2 - 5), text,
                  fill=ink, font=font)
  for i, name in enumerate(names):
    draw.text((4, y0 + i * cell + cell / 2 - 5), name, fill=(0, 0, 0),
              font=font)
  # Column names: drawn horizontally on a strip, then rotated upright.
  strip = Image.new('RGB', (label_w, c * cell), (255, 255, 255))
  strip_draw = ImageDraw.Draw(strip)
  for j, name in enumerate(names):
    strip_draw.text((4, j * cell + cell / 2 - 5), name, fill=(0, 0, 0),
                    font=font)
  canvas.paste(strip.rotate(90, expand=True), (x0, title_h))
  return np.asarray(canvas, np.uint8)
