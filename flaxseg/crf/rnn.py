"""CRF-as-RNN: dense-CRF mean-field inference as a trainable recurrent layer.

Zheng et al., "Conditional Random Fields as Recurrent Neural Networks"
(ICCV 2015). Each mean-field iteration is a stack of differentiable steps
(sec. 4, fig. 1), here one step of a ``lax.scan``:

    Q      = softmax(E)                              (normalising, sec. 4.1)
    m_k    = Kn_k(Q)            k = spatial, bilateral    (message passing)
    msg    = W_s m_s + W_b m_b                       (weighting filter outputs)
    P      = mu msg                                  (compatibility transform)
    E'     = U - P                                   (adding unary potentials)

with ``U`` the network's scores (logits), ``E^0 = U`` and the layer returning
the last ``E'`` (logits: the loss applies the softmax). This is the released
Caffe layer step for step (torrvision/crfasrnn, ``meanfield_iteration.cpp``
and ``multi_stage_meanfield.cpp``, read for this module):

* kernel weights ``W_s``, ``W_b`` are ``[L, L]`` matrices (``msg[l] =
  sum_l' W[l, l'] m(l')``) initialised to ``diag(w)``;
* the compatibility ``mu`` is an ``[L, L]`` matrix initialised to Potts as
  that code does it, ``mu = -I`` (``E' = U + W m``, pydensecrf's Potts
  ``-w Q``; it equals the textbook ``[l != l']`` up to a per-pixel constant,
  which the softmax ignores);
* the spatial kernel's features are ``(x, y) / theta_gamma``, the bilateral
  kernel's ``((x, y) / theta_alpha, rgb / theta_beta)`` with colours in 0..255;
* normalisation ``m = K Q / (K 1)`` (``'after'``); pydensecrf's
  ``'symmetric'`` is available too.

Defaults are the released model's (``TVG_CRFRNN_COCO_VOC.prototxt``:
``theta_alpha=160, theta_beta=3, theta_gamma=3, spatial_filter_weight=3,
bilateral_filter_weight=5``) and the paper's iteration counts (sec. 5: "we
set T = 5 during training ... and T = 10 at test time").

Beyond the reference implementations (batch size 1, fixed bandwidths):
batches, any of flaxseg's filter backends (``permutohedral`` by default, as
the paper; ``exact``/``window`` for small inputs or TPUs), optionally learnable
bandwidths (parametrised by their logarithm), optional rematerialisation of
each iteration, and plain ``jit``/``pmap``/``shard_map`` use (no host code).
"""

from __future__ import annotations

import math
from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.crf import meanfield

Array = jax.Array

#: Released CRF-RNN mean-field settings (TVG_CRFRNN_COCO_VOC.prototxt).
THETA_ALPHA = 160.0
THETA_BETA = 3.0
THETA_GAMMA = 3.0
SPATIAL_WEIGHT = 3.0
BILATERAL_WEIGHT = 5.0


def _diagonal(value: float):
  def init(key, shape, dtype=jnp.float32):
    del key
    return value * jnp.eye(shape[0], dtype=dtype)
  return init


def _potts(key, shape, dtype=jnp.float32):
  del key
  return -jnp.eye(shape[0], dtype=dtype)


class CRFasRNN(nn.Module):
  """Mean-field iterations of the dense CRF as a recurrent Flax layer.

  ``__call__(unary_logits [B, H, W, L], image [B, H, W, 3], train)`` returns
  ``[B, H, W, L]`` logits after ``num_iterations`` (train) or
  ``eval_iterations`` (inference) mean-field steps. ``image`` holds colours
  in the 0..255 range.

  Attributes:
    num_classes: labels ``L``.
    num_iterations: iterations in training (paper: 5).
    eval_iterations: iterations at inference (paper: 10).
    theta_alpha: bilateral kernel's spatial bandwidth, pixels.
    theta_beta: bilateral kernel's colour bandwidth, 0..255 units.
    theta_gamma: spatial kernel's bandwidth, pixels.
    spatial_weight: initial diagonal of the spatial kernel weights.
    bilateral_weight: initial diagonal of the bilateral kernel weights.
    learn_bandwidths: make ``theta_*`` parameters (``log_bandwidths``).
    backend: filter backend (``flaxseg.crf.meanfield.BACKENDS``).
    normalization: ``'after'`` (CRF-RNN) or ``'symmetric'`` (pydensecrf).
    window_size, downsample: the ``window`` backend's settings.
    remat: recompute each iteration in the backward pass (memory ~1 step).
  """
  num_classes: int
  num_iterations: int = 5
  eval_iterations: int = 10
  theta_alpha: float = THETA_ALPHA
  theta_beta: float = THETA_BETA
  theta_gamma: float = THETA_GAMMA
  spatial_weight: float = SPATIAL_WEIGHT
  bilateral_weight: float = BILATERAL_WEIGHT
  learn_bandwidths: bool = False
  backend: str = 'permutohedral'
  normalization: str = 'after'
  window_size: int = 11
  downsample: int = 1
  remat: bool = False

  def bandwidths(self) -> Tuple[Array, Array, Array]:
    """``(theta_alpha, theta_beta, theta_gamma)``, learned or fixed."""
    init = (self.theta_alpha, self.theta_beta, self.theta_gamma)
    if not self.learn_bandwidths:
      return tuple(jnp.asarray(t, jnp.float32) for t in init)
    log_theta = self.param(
        'log_bandwidths',
        lambda key, shape: jnp.log(jnp.asarray(init, jnp.float32)), (3,))
    theta = jnp.exp(log_theta)
    return theta[0], theta[1], theta[2]

  @nn.compact
  def __call__(self, unary_logits: Array, image: Array, train: bool = False
               ) -> Array:
    if unary_logits.ndim != 4 or unary_logits.shape[-1] != self.num_classes:
      raise ValueError(f'unary_logits must be [B, H, W, {self.num_classes}], '
                       f'got shape {unary_logits.shape}')
    if tuple(image.shape) != tuple(unary_logits.shape[:3]) + (3,):
      raise ValueError(f'image must be [B, H, W, 3] with B, H, W of the '
                       f'logits {unary_logits.shape}, got {image.shape}')
    n = self.num_classes
    w_spatial = self.param('spatial_weights', _diagonal(self.spatial_weight),
                           (n, n))
    w_bilateral = self.param('bilateral_weights',
                             _diagonal(self.bilateral_weight), (n, n))
    compat = self.param('compatibility', _potts, (n, n))
    alpha, beta, gamma = self.bandwidths()

    # float32 at least (also for bf16 networks); float64 passes through.
    dtype = jnp.promote_types(
        jnp.result_type(unary_logits, w_spatial, w_bilateral, compat),
        jnp.float32)
    unary = unary_logits.astype(dtype)
    image = image.astype(dtype)
    fns, _ = meanfield.build_filters(
        image, n, smoothness=meanfield.GaussianKernel(sxy=gamma, weight=1.0),
        appearance=meanfield.BilateralKernel(sxy=alpha, srgb=beta,
                                             weight=1.0),
        backend=self.backend, window_size=self.window_size,
        downsample=self.downsample, normalization=self.normalization,
        dtype=dtype, feature_gradients=self.learn_bandwidths)
    spatial_fn, bilateral_fn = fns
    hi = jax.lax.Precision.HIGHEST

    def step(energy, _):
      q = jax.nn.softmax(energy, axis=-1)
      msg = (jnp.einsum('bhwk,lk->bhwl', spatial_fn(q), w_spatial,
                        precision=hi) +
             jnp.einsum('bhwk,lk->bhwl', bilateral_fn(q), w_bilateral,
                        precision=hi))
      pairwise = jnp.einsum('bhwk,lk->bhwl', msg, compat, precision=hi)
      return (unary - pairwise).astype(dtype), None

    if self.remat:
      step = jax.checkpoint(step)
    iterations = self.num_iterations if train else self.eval_iterations
    energy, _ = jax.lax.scan(step, unary, None, length=iterations)
    return energy


def validate(num_iterations: int, eval_iterations: int, theta_alpha: float,
             theta_beta: float, theta_gamma: float, backend: str,
             normalization: str) -> None:
  """Raises ``ValueError`` naming the first invalid CRF-as-RNN setting."""
  for name, value in (('num_iterations', num_iterations),
                      ('eval_iterations', eval_iterations)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f'{name}={value!r} must be a positive integer')
  for name, value in (('theta_alpha', theta_alpha), ('theta_beta', theta_beta),
                      ('theta_gamma', theta_gamma)):
    if not (isinstance(value, (int, float)) and value > 0
            and math.isfinite(value)):
      raise ValueError(f'{name}={value!r} must be a positive number')
  if backend not in meanfield.BACKENDS:
    raise ValueError(f'backend={backend!r} must be one of '
                     f'{meanfield.BACKENDS}')
  if normalization not in ('after', 'symmetric'):
    raise ValueError(f"normalization={normalization!r} must be 'after' or "
                     "'symmetric'")
