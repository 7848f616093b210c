"""Shared helpers of the CRF tests."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))


def tiny_v1_config(num_visualize=0):
  """configs/deeplabv1.py:tiny for 2 steps, evaluated with a 3-iteration CRF
  whose bandwidths suit its 24-32 px images (the paper's are for 500 px)."""
  sys.path.insert(0, os.path.join(ROOT, 'configs'))
  try:
    import deeplabv1  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  config = deeplabv1.get_config('tiny')
  config.train.num_steps = 2
  config.eval.num_visualize = num_visualize
  config.eval.crf.enabled = True
  config.eval.crf.num_iterations = 3
  config.eval.crf.bi_xy_std = 10.0
  return config
