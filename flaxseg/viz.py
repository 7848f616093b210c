"""Colour-coded label maps and prediction pictures (VOC palette)."""

from __future__ import annotations

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


def prediction_panel(image: np.ndarray, label: np.ndarray,
                     prediction: np.ndarray) -> np.ndarray:
  """Image | ground truth | prediction | overlay, side by side (uint8 RGB)."""
  gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
  parts = [image, colorize(label), colorize(prediction),
           overlay(image, prediction)]
  out = [parts[0]]
  for p in parts[1:]:
    out += [gap, p]
  return np.concatenate(out, axis=1)


def save_palette_png(path: str, label: np.ndarray) -> None:
  """Writes a label map as a VOC-style palette PNG (class ids = indices)."""
  img = Image.fromarray(np.asarray(label, np.uint8), mode='P')
  img.putpalette(voc_palette().reshape(-1).tolist())
  img.save(path)


def save_rgb(path: str, image: np.ndarray) -> None:
  """Writes an RGB uint8 array as PNG, creating the directory."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  Image.fromarray(np.asarray(image, np.uint8)).save(path)
