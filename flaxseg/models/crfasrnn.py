"""CRF-RNN: FCN-8s followed by CRF-as-RNN (Zheng et al., ICCV 2015).

The network of the paper (sec. 5, fig. 4): FCN-8s (``fcn.FCN`` at stride 8)
computes the unary scores at input resolution, and the CRF-as-RNN layer
(:class:`flaxseg.crf.rnn.CRFasRNN`) runs mean-field iterations on them with
the image; the result is the logits. Training is the paper's two stages
(sec. 5 "Implementation details"; ``configs/crfasrnn.py``): FCN-8s alone first,
then the whole network end to end, initialised from the first stage.

The model's parameters are FCN-8s's, with the same names at the top level
(so a ``fcn8s`` checkpoint loads into it unchanged), plus the CRF's under
``crf``::

  backbone/..., score_fr, score_pool4, score_pool3, upscore2, upscore_pool4,
  upscore8                                   (fcn.py)
  crf/spatial_weights, crf/bilateral_weights, crf/compatibility   ([L, L])
  crf/log_bandwidths                         (only with learn_bandwidths)

The CRF needs the image's colours in 0..255: the model undoes the input
normalisation with ``pixel_mean`` / ``pixel_std`` (``[0, 1]`` units, the
trainer fills them in from ``config.data``). ``aux['unary_logits']`` holds
FCN-8s's scores.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import flax.linen as nn

from flaxseg.config import IMAGENET_MEAN, IMAGENET_STD
from flaxseg.crf import rnn
from flaxseg.models import fcn
from flaxseg.models.layers import canonicalize_dtype

Array = jax.Array


class CRFasRNNNet(fcn.FCN):
  """FCN (stride 8) + CRF-as-RNN; see the module docstring.

  Attributes (besides ``fcn.FCN``'s):
    num_iterations, eval_iterations, theta_alpha, theta_beta, theta_gamma,
    spatial_weight, bilateral_weight, learn_bandwidths, crf_backend,
    crf_normalization, window_size, downsample, remat: the CRF layer's
      settings (``rnn.CRFasRNN``; ``crf_backend`` is its ``backend``).
    pixel_mean, pixel_std: the input normalisation, ``[0, 1]`` units.
  """
  num_iterations: int = 5
  eval_iterations: int = 10
  theta_alpha: float = rnn.THETA_ALPHA
  theta_beta: float = rnn.THETA_BETA
  theta_gamma: float = rnn.THETA_GAMMA
  spatial_weight: float = rnn.SPATIAL_WEIGHT
  bilateral_weight: float = rnn.BILATERAL_WEIGHT
  learn_bandwidths: bool = False
  crf_backend: str = 'permutohedral'
  crf_normalization: str = 'after'
  window_size: int = 11
  downsample: int = 1
  remat: bool = False
  pixel_mean: Tuple[float, float, float] = IMAGENET_MEAN
  pixel_std: Tuple[float, float, float] = IMAGENET_STD

  @nn.compact
  def __call__(self, x: Array, train: bool = False
               ) -> Tuple[Array, Dict[str, Array]]:
    """Segments a batch of normalised images ``(N, H, W, 3)``.

    Returns:
      ``(logits, {'unary_logits': FCN-8s scores})``, float32
      ``(N, H, W, num_classes)``.
    """
    unary, _ = super().__call__(x, train)
    mean = jnp.asarray(self.pixel_mean, jnp.float32)
    std = jnp.asarray(self.pixel_std, jnp.float32)
    image = (x.astype(jnp.float32) * std + mean) * 255.0
    logits = rnn.CRFasRNN(
        num_classes=self.num_classes, num_iterations=self.num_iterations,
        eval_iterations=self.eval_iterations, theta_alpha=self.theta_alpha,
        theta_beta=self.theta_beta, theta_gamma=self.theta_gamma,
        spatial_weight=self.spatial_weight,
        bilateral_weight=self.bilateral_weight,
        learn_bandwidths=self.learn_bandwidths, backend=self.crf_backend,
        normalization=self.crf_normalization, window_size=self.window_size,
        downsample=self.downsample, remat=self.remat,
        name='crf')(unary, image, train)
    return logits, {'unary_logits': unary}


def crfasrnn(*, num_classes: int, dtype: Any = 'float32',
             padding: str = 'paper', width_multiplier: float = 1.0,
             dropout: float = 0.5, learn_final_upsampling: bool = False,
             zero_init_scores: bool = True, num_iterations: int = 5,
             eval_iterations: int = 10,
             theta_alpha: float = rnn.THETA_ALPHA,
             theta_beta: float = rnn.THETA_BETA,
             theta_gamma: float = rnn.THETA_GAMMA,
             spatial_weight: float = rnn.SPATIAL_WEIGHT,
             bilateral_weight: float = rnn.BILATERAL_WEIGHT,
             learn_bandwidths: bool = False,
             crf_backend: str = 'permutohedral',
             crf_normalization: str = 'after', window_size: int = 11,
             downsample: int = 1, remat: bool = False,
             pixel_mean: Sequence[float] = IMAGENET_MEAN,
             pixel_std: Sequence[float] = IMAGENET_STD,
             bn_axis_name: Optional[str] = None) -> CRFasRNNNet:
  """CRF-RNN (Zheng et al. 2015): FCN-8s + CRF-as-RNN, paper settings.

  Args:
    num_classes: output classes.
    dtype: the FCN's computation dtype (the CRF runs in float32).
    padding, width_multiplier, dropout, learn_final_upsampling,
      zero_init_scores: FCN-8s's options (``fcn.fcn8s``).
    num_iterations: mean-field iterations in training (paper: 5).
    eval_iterations: mean-field iterations at inference (paper: 10).
    theta_alpha, theta_beta, theta_gamma: bandwidths (released model: 160,
      3, 3).
    spatial_weight, bilateral_weight: initial kernel weights (3, 5).
    learn_bandwidths: learn the three bandwidths too.
    crf_backend: 'permutohedral' (paper), 'exact' or 'window'.
    crf_normalization: 'after' (CRF-RNN) or 'symmetric' (pydensecrf).
    window_size, downsample: the window backend's settings.
    remat: rematerialise each mean-field iteration in the backward pass.
    pixel_mean, pixel_std: input normalisation, [0, 1] units.
    bn_axis_name: ignored (no BatchNorm); the trainer passes it to every
      model.

  Returns:
    A `CRFasRNNNet` module.
  """
  del bn_axis_name
  fcn_args = dict(num_classes=num_classes, dtype=dtype, padding=padding,
                  width_multiplier=width_multiplier, dropout=dropout,
                  learn_final_upsampling=learn_final_upsampling,
                  zero_init_scores=zero_init_scores)
  base = fcn.fcn8s(**fcn_args)  # validates the FCN options
  rnn.validate(num_iterations, eval_iterations, theta_alpha, theta_beta,
               theta_gamma, crf_backend, crf_normalization)
  for name, value in (('pixel_mean', pixel_mean), ('pixel_std', pixel_std)):
    if len(tuple(value)) != 3:
      raise ValueError(f'{name}={value!r} must have 3 values')
  if min(pixel_std) <= 0:
    raise ValueError(f'pixel_std={pixel_std!r} must be positive')
  return CRFasRNNNet(
      num_classes=num_classes, stride=8, padding=base.padding,
      width_multiplier=base.width_multiplier, dropout=base.dropout,
      learn_final_upsampling=base.learn_final_upsampling,
      zero_init_scores=base.zero_init_scores,
      dtype=canonicalize_dtype(dtype), num_iterations=num_iterations,
      eval_iterations=eval_iterations, theta_alpha=float(theta_alpha),
      theta_beta=float(theta_beta), theta_gamma=float(theta_gamma),
      spatial_weight=float(spatial_weight),
      bilateral_weight=float(bilateral_weight),
      learn_bandwidths=bool(learn_bandwidths), crf_backend=crf_backend,
      crf_normalization=crf_normalization, window_size=int(window_size),
      downsample=int(downsample), remat=bool(remat),
      pixel_mean=tuple(float(v) for v in pixel_mean),
      pixel_std=tuple(float(v) for v in pixel_std))
