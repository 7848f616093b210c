"""Shared building blocks for the segmentation models.

* `resize_bilinear`: NHWC bilinear resizing with PyTorch's two corner
  conventions, so logits and features line up with torchvision exactly.
* `FrozenBatchNorm`: torchvision's ``FrozenBatchNorm2d`` with the variable names
  of `flax.linen.BatchNorm`, so checkpoints and converted weights load into
  either.
* `make_norm`: the one normalisation factory every model uses.
* `conv_kernel_init` and `canonicalize_dtype`: initialisation and dtype
  handling shared by the model families.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any
ModuleDef = Callable[..., nn.Module]

#: torchvision's ResNet initialisation (``kaiming_normal_(mode='fan_out',
#: nonlinearity='relu')``): an untruncated normal with variance 2 / fan_out,
#: fan_out = out_channels * kernel_h * kernel_w.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

#: PyTorch's BatchNorm epsilon; TF DeepLab uses the same value.
BN_EPSILON = 1e-5

# float64 (with jax_enable_x64) is for numerical checks against references.
_FLOAT_DTYPES = ('float32', 'bfloat16', 'float16', 'float64')


def output_dtype(dtype) -> jnp.dtype:
  """The dtype logits and losses are kept in: float32, or float64 if wider."""
  return jnp.promote_types(dtype, jnp.float32)


def canonicalize_dtype(dtype: Union[str, Dtype]) -> jnp.dtype:
  """Turns a dtype or its name into a floating `jnp.dtype`.

  Args:
    dtype: a jnp dtype or one of the names 'float32', 'bfloat16', 'float16'
      (or 'float64', for numerical checks with ``jax_enable_x64``).

  Returns:
    The corresponding `jnp.dtype`.

  Raises:
    ValueError: if `dtype` is not one of the supported floating dtypes.
  """
  try:
    result = jnp.dtype(dtype)
  except TypeError as e:
    raise ValueError(f'dtype={dtype!r} is not a dtype; expected one of '
                     f'{_FLOAT_DTYPES}') from e
  if result.name not in _FLOAT_DTYPES:
    raise ValueError(f'dtype={dtype!r} is not a supported computation dtype; '
                     f'expected one of {_FLOAT_DTYPES}')
  return result


def _is_static(dim) -> bool:
  return isinstance(dim, (int, np.integer))


def _dim(dim):
  """``int(dim)``, or ``dim`` itself when it is symbolic (``jax.export``)."""
  try:
    return int(dim)
  except Exception:  # pylint: disable=broad-except
    return dim


def _align_corners_weights(in_size: int, out_size: int):
  """Gather indices and lerp weights for one axis, align_corners=True."""
  if out_size == 1 or in_size == 1:
    # PyTorch maps every output to input index 0 when out_size == 1.
    src = jnp.zeros((out_size,), jnp.float32)
  elif _is_static(in_size) and _is_static(out_size):
    src = jnp.arange(out_size, dtype=jnp.float32) * (
        (in_size - 1) / (out_size - 1))
  else:  # symbolic sizes (shape-polymorphic export): the ratio is traced
    src = jnp.arange(out_size, dtype=jnp.float32) * (
        jnp.asarray(in_size - 1, jnp.float32) /
        jnp.asarray(out_size - 1, jnp.float32))
  lo = jnp.clip(jnp.floor(src).astype(jnp.int32), 0, in_size - 1)
  hi = jnp.minimum(lo + 1, in_size - 1)
  frac = src - lo.astype(jnp.float32)
  return lo, hi, frac


def _lerp_axis(x: Array, axis: int, out_size: int) -> Array:
  lo, hi, frac = _align_corners_weights(x.shape[axis], out_size)
  shape = [1] * x.ndim
  shape[axis] = out_size
  frac = frac.reshape(shape).astype(x.dtype)
  a = jnp.take(x, lo, axis=axis)
  b = jnp.take(x, hi, axis=axis)
  return a + (b - a) * frac


def resize_bilinear(x: Array, size: Sequence[int],
                    align_corners: bool = False) -> Array:
  """Bilinearly resizes an NHWC batch to spatial `size`.

  With ``align_corners=False`` this equals PyTorch's
  ``F.interpolate(x, size, mode='bilinear', align_corners=False)`` (half-pixel
  centres, no antialiasing when downsampling): output pixel ``i`` samples input
  coordinate ``max(0, (i + 0.5) * in / out - 0.5)``, neighbours clamped at the
  border. `jax.image.resize` implements exactly this with ``antialias=False``.

  With ``align_corners=True`` the corner pixels of input and output coincide:
  output pixel ``i`` samples input coordinate ``i * (in - 1) / (out - 1)``
  (TF1 ``tf.image.resize_bilinear(align_corners=True)``, which the original
  DeepLab code uses). This is done with an explicit gather and lerp per axis.

  Args:
    x: array of shape (N, H, W, C).
    size: target (height, width).
    align_corners: corner convention, see above.

  Returns:
    Array of shape (N, size[0], size[1], C) and the dtype of `x`.
  """
  if x.ndim != 4:
    raise ValueError(f'resize_bilinear expects NHWC input, got shape {x.shape}')
  out_h, out_w = _dim(size[0]), _dim(size[1])
  n, h, w, c = x.shape
  if (h, w) == (out_h, out_w):
    return x
  if not align_corners:
    return jax.image.resize(x, (n, out_h, out_w, c), method='bilinear',
                            antialias=False).astype(x.dtype)
  y = _lerp_axis(x, 1, out_h) if h != out_h else x
  return _lerp_axis(y, 2, out_w) if w != out_w else y


class FrozenBatchNorm(nn.Module):
  """BatchNorm with fixed statistics and affine parameters.

  Semantics of torchvision's ``FrozenBatchNorm2d``: always normalises with the
  running statistics, never updates them, and its affine parameters receive no
  gradient. Variable names match `flax.linen.BatchNorm` (params ``scale`` and
  ``bias``, batch_stats ``mean`` and ``var``) so the same checkpoint or
  converted torchvision weights load into either. Because ``scale`` and
  ``bias`` live in ``params`` an optimiser still sees them: their gradients
  are exactly zero, but decoupled weight decay would shrink them unless the
  trainer masks it.

  Attributes:
    epsilon: added to the variance (torchvision: 1e-5).
    dtype: computation dtype of the output.
    param_dtype: dtype of the variables.
    use_running_average: accepted for interface compatibility with
      `nn.BatchNorm`; ignored (always True).
    momentum, axis_name: accepted for interface compatibility; ignored.
  """
  epsilon: float = BN_EPSILON
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  use_running_average: Optional[bool] = None
  momentum: float = 0.9
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: Array, use_running_average: Optional[bool] = None
               ) -> Array:
    """Normalises the last axis of `x` with the stored statistics.

    Args:
      x: input, channels last.
      use_running_average: ignored; present so call sites can treat this
        module and `nn.BatchNorm` alike.

    Returns:
      Normalised `x` in `dtype` (or the dtype of `x` when `dtype` is None).
    """
    del use_running_average
    features = x.shape[-1]
    mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros(
        (features,), jnp.float32)).value
    var = self.variable('batch_stats', 'var', lambda: jnp.ones(
        (features,), jnp.float32)).value
    scale = self.param('scale', nn.initializers.ones, (features,),
                       self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (features,),
                      self.param_dtype)
    scale, bias, mean, var = jax.lax.stop_gradient((scale, bias, mean, var))
    mult = scale.astype(jnp.float32) * jax.lax.rsqrt(
        var.astype(jnp.float32) + self.epsilon)
    shift = bias.astype(jnp.float32) - mean.astype(jnp.float32) * mult
    dtype = self.dtype or x.dtype
    return (x.astype(dtype) * mult.astype(dtype) + shift.astype(dtype))


def make_norm(*, momentum: float = 0.9, axis_name: Optional[str] = None,
              frozen: bool = False, dtype: Dtype = jnp.float32) -> ModuleDef:
  """Returns the BatchNorm constructor shared by every model.

  Call sites pass the mode at call time, ``norm(name='bn1')(x,
  use_running_average=not train)``, which both `nn.BatchNorm` and
  `FrozenBatchNorm` accept.

  Args:
    momentum: Flax convention, ``running = momentum * running + (1 - momentum)
      * batch``; PyTorch's momentum 0.1 is 0.9 here, TF DeepLab's decay is
      0.9997.
    axis_name: mapped axis to average batch statistics over (synchronised
      BatchNorm under pmap / shard_map); None for per-device statistics.
    frozen: use `FrozenBatchNorm` (running statistics, no gradient).
    dtype: computation dtype; statistics and params stay float32.

  Returns:
    A `functools.partial` of `nn.BatchNorm` or `FrozenBatchNorm`.

  Batch variances are two-pass, ``mean((x - mean(x))^2)`` as PyTorch computes
  them, not Flax's default one-pass ``mean(x^2) - mean(x)^2``: in float32 the
  latter cancels badly on post-ReLU activations (in the torchvision
  training-step parity test it put the head BatchNorm's gradient 3e-3 from
  torchvision's; two-pass, 1e-4).
  """
  if frozen:
    return functools.partial(FrozenBatchNorm, epsilon=BN_EPSILON, dtype=dtype)
  return functools.partial(nn.BatchNorm, momentum=momentum,
                           epsilon=BN_EPSILON, axis_name=axis_name, dtype=dtype,
                           use_fast_variance=False)
