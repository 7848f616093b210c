"""Shared building blocks for the segmentation models.

* `resize_bilinear`: NHWC bilinear resizing with PyTorch's two corner
  conventions, so logits and features line up with torchvision exactly.
* `FrozenBatchNorm`: torchvision's ``FrozenBatchNorm2d`` with the variable names
  of `flax.linen.BatchNorm`, so checkpoints and converted weights load into
  either.
* `make_norm`: the one normalisation factory every model uses.
* `OrderedSyncBatchNorm`: synchronised BatchNorm whose cross-device means
  are summed in device order (``config.train.reduction='ordered'``, see
  `flaxseg.collectives`), with `nn.BatchNorm`'s variables and formulas.
* `conv_kernel_init` and `canonicalize_dtype`: initialisation and dtype
  handling shared by the model families.
* `MatmulConv` and `conv_module`: `nn.Conv`'s computation written as one
  matrix multiply per kernel tap over the pixels the tap reaches, with
  `nn.Conv`'s parameters; it skips the zero padding that large atrous rates
  make dominant (see BENCHMARKS.md). Selected per model by ``conv_impl``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxseg import collectives

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


class OrderedSyncBatchNorm(nn.Module):
  """`nn.BatchNorm` (two-pass variance) with device-ordered statistic sums.

  Same variables (params ``scale``/``bias``, batch_stats ``mean``/``var``),
  call signature and formulas as ``nn.BatchNorm(use_fast_variance=False)``;
  only the cross-device means go through `flaxseg.collectives.pmean` with an
  `OrderedAxis`, so they do not depend on the collective's summation order.

  Attributes:
    momentum: running-average momentum (Flax convention).
    epsilon: added to the variance.
    dtype: output dtype (default: the promoted input/param dtype).
    axis_name: the data axis (an `OrderedAxis`), or None.
  """
  momentum: float = 0.99
  epsilon: float = BN_EPSILON
  dtype: Optional[Dtype] = None
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, use_running_average: bool = False):
    c = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean',
                            lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var',
                           lambda: jnp.ones((c,), jnp.float32))
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      xf = jnp.asarray(x, jnp.promote_types(x.dtype, jnp.float32))
      # As nn.BatchNorm: no cross-device mean while initialising (init runs
      # outside the mapped function).
      axis = None if self.is_initializing() else self.axis_name
      mean = collectives.pmean(xf.mean(axes), axis)
      var = collectives.pmean(jnp.square(xf - mean).mean(axes), axis)
      if not self.is_initializing():
        ra_mean.value = (self.momentum * ra_mean.value
                         + (1 - self.momentum) * mean)
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    y = (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    dtype = self.dtype or jnp.result_type(x, scale)
    return jnp.asarray(y, dtype)


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
    A `functools.partial` of `nn.BatchNorm` or `FrozenBatchNorm`; of
    `OrderedSyncBatchNorm` when ``axis_name`` is a
    `flaxseg.collectives.OrderedAxis`.

  Batch variances are two-pass, ``mean((x - mean(x))^2)`` as PyTorch computes
  them, not Flax's default one-pass ``mean(x^2) - mean(x)^2``: in float32 the
  latter cancels badly on post-ReLU activations (in the torchvision
  training-step parity test it put the head BatchNorm's gradient 3e-3 from
  torchvision's; two-pass, 1e-4).
  """
  if frozen:
    return functools.partial(FrozenBatchNorm, epsilon=BN_EPSILON, dtype=dtype)
  if isinstance(axis_name, collectives.OrderedAxis):
    return functools.partial(OrderedSyncBatchNorm, momentum=momentum,
                             epsilon=BN_EPSILON, axis_name=axis_name,
                             dtype=dtype)
  return functools.partial(nn.BatchNorm, momentum=momentum,
                           epsilon=BN_EPSILON, axis_name=axis_name, dtype=dtype,
                           use_fast_variance=False)


def computed_once(x: Array) -> Array:
  """``x``, bit for bit, as a value XLA:CPU computes once and stores.

  XLA:CPU's fusion pass copies cheap elementwise producers into each of
  their consumers, recursively, and `jax.lax.optimization_barrier` does not
  stop it there (XLA:CPU expands barriers before it fuses). On a residual
  stream, ``out_k = relu(bn(conv(...)) + out_{k-1})``, that rebuilds the
  whole chain of earlier blocks inside every block's fusion: in ResNet-101's
  training step each layer3 block's output and ReLU-gradient fusion read
  the outputs of every earlier block (up to 123 operands), work quadratic
  in depth. A floating-point division is among the operations XLA's fusion
  does not duplicate, so ``x / one`` is stored once and read by every
  consumer. ``one`` is a full-shaped array of 1.0 that XLA cannot fold
  away, ``1 + (x != x) * 0`` computed at run time: a scalar 1.0 broadcast
  would not do, since XLA's algebraic simplifier turns division by a
  broadcast into multiplication by its reciprocal, and a multiply it
  duplicates (in ResNet-101's inference graph each layer3 block's output
  fusion then read up to 141 operands). Dividing by one is exact (NaN,
  infinities and signed zeros included, since ``(x != x) * 0`` is 0 for
  every ``x``; subnormals XLA:CPU flushes to zero in any arithmetic, the
  ReLU before it included) and so is its gradient. On other backends,
  whose fusion weighs costs, it returns ``x``.
  """
  if jax.default_backend() != 'cpu' or x.size == 0:
    return x
  nan = jax.lax.stop_gradient(x != x)
  return x / (1 + nan.astype(x.dtype) * 0)


#: ``conv_impl`` values: XLA's convolution; `MatmulConv` (per-tap matmuls,
#: XLA's convolution for the dense, narrow stride-1 ones where it is faster);
#: `MatmulConv` with taps everywhere but the stem; or 'auto' (matmul on CPU,
#: where XLA's convolutions are slow, XLA's elsewhere).
CONV_IMPLS = ('auto', 'xla', 'matmul', 'taps')


def _pairs(value, n: int, name: str):
  if value is None:
    return (1,) * n
  if isinstance(value, int):
    return (value,) * n
  value = tuple(int(v) for v in value)
  if len(value) != n:
    raise ValueError(f'{name}={value!r} must have {n} entries')
  return value


#: Below this many input channels `MatmulConv` calls XLA's convolution.
MATMUL_MIN_CHANNELS = 16
#: `MatmulConv` hands a stride-1 convolution whose taps reach at least this
#: fraction of a dense convolution's products (and whose channels are at most
#: its ``xla_max_channels``) to XLA's convolution.
XLA_MIN_TAP_DENSITY = 0.7


def _valid_outputs(offset: int, size_in: int, size_out: int, stride: int):
  """Output indices ``[lo, hi)`` whose input ``i * stride + offset`` exists."""
  lo = 0 if offset >= 0 else (-offset + stride - 1) // stride
  last = size_in - 1 - offset
  hi = min(size_out, last // stride + 1) if last >= 0 else 0
  return lo, max(lo, hi)


class MatmulConv(nn.Module):
  """A 2-D convolution computed as a sum of one matrix multiply per tap.

  Same attributes, parameters (``kernel`` ``[kh, kw, in, out]``, ``bias``)
  and result as `nn.Conv` for NHWC inputs with ``feature_group_count=1`` and
  no input dilation, so checkpoints and imported weights are shared. Each of
  the ``kh * kw`` taps multiplies the (strided, dilated) input pixels it
  actually reaches by its ``[in, out]`` kernel slice and adds the product into
  the output rows and columns it lands on; zero padding is never materialised
  or multiplied. That is exact, and it is what makes the large atrous rates of
  ASPP cheap: with rate 36 on a 41x41 map (DeepLab v3 at output stride 8) the
  eight outer taps reach 5 of 41 rows or columns, so the branch costs 17% of
  the dense convolution that XLA (and cuDNN, and PyTorch) compute. The
  backward pass is matmuls and slice/pad adds as well. A 1x1 convolution is
  one matmul. Inputs with fewer than `MATMUL_MIN_CHANNELS` channels (an RGB
  stem) go to XLA's convolution, which is faster there, and so do inputs of
  symbolic size (`jax.export` with polymorphic shapes). So do dense stride-1
  convolutions (taps reaching at least `XLA_MIN_TAP_DENSITY` of the dense
  products) with at most ``xla_max_channels`` input and output channels:
  on XLA:CPU its convolution beats the taps there (ResNet layer1-3's 3x3 at
  rates 1-2, 64-256 channels: 1.2-2x, forward and backward), while the taps
  win on wider (layer4's 512 channels), strided or sparse (ASPP) ones; see
  BENCHMARKS.md.

  Attributes:
    features: output channels.
    kernel_size: ``(kh, kw)``.
    strides: int or pair.
    padding: 'SAME', 'VALID', an int, or ``((top, bottom), (left, right))``.
    kernel_dilation: int or pair (atrous rate).
    use_bias: add a bias.
    dtype: computation dtype (None: promote input and kernel).
    param_dtype: parameter dtype.
    precision: `jax.lax.Precision` of the matmuls.
    kernel_init, bias_init: initialisers (those of `nn.Conv` by default).
    xla_max_channels: widest dense stride-1 convolution handed to XLA's
      convolution (0: always taps, except the stem and symbolic sizes).
  """
  features: int
  kernel_size: Sequence[int]
  strides: Union[None, int, Sequence[int]] = 1
  padding: Any = 'SAME'
  kernel_dilation: Union[None, int, Sequence[int]] = 1
  use_bias: bool = True
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None
  kernel_init: Callable = nn.linear.default_kernel_init
  bias_init: Callable = nn.initializers.zeros_init()
  xla_max_channels: int = 256

  def _xla_conv(self, x, kernel, bias, strides, padding, dilation):
    y = jax.lax.conv_general_dilated(
        x, kernel, strides, padding, rhs_dilation=dilation,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=self.precision)
    return y if bias is None else y + bias

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if x.ndim != 4:
      raise ValueError(f'MatmulConv expects NHWC input, got shape {x.shape}')
    kh, kw = _pairs(self.kernel_size, 2, 'kernel_size')
    sh, sw = _pairs(self.strides, 2, 'strides')
    dh, dw = _pairs(self.kernel_dilation, 2, 'kernel_dilation')
    n, h, w, cin = x.shape
    kernel = self.param('kernel', self.kernel_init,
                        (kh, kw, cin, self.features), self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,),
                       self.param_dtype) if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias,
                                              dtype=self.dtype)
    padding = self.padding
    if isinstance(padding, int):
      padding = ((padding, padding), (padding, padding))
    if (cin < MATMUL_MIN_CHANNELS and kh * kw > 1) or not (
        _is_static(h) and _is_static(w)):
      # A few input channels (the RGB stem): per-tap matmuls of depth 3
      # are slow, XLA's convolution is not. Symbolic sizes (shape-polymorphic
      # export): the taps' extents cannot be computed, XLA's can.
      if not isinstance(padding, str):
        padding = [tuple(int(v) for v in p) for p in padding]
      return self._xla_conv(x, kernel, bias, (sh, sw), padding, (dh, dw))
    if isinstance(padding, str):
      padding = jax.lax.padtype_to_pads(
          (h, w), ((kh - 1) * dh + 1, (kw - 1) * dw + 1), (sh, sw), padding)
    (pt, pb), (pl, pr) = [tuple(int(v) for v in p) for p in padding]
    out_h = (h + pt + pb - (kh - 1) * dh - 1) // sh + 1
    out_w = (w + pl + pr - (kw - 1) * dw - 1) // sw + 1
    if out_h < 1 or out_w < 1:
      raise ValueError(f'MatmulConv: input {(h, w)} padded by {padding} is '
                       f'smaller than the dilated kernel {(kh, kw)} x '
                       f'{(dh, dw)}')
    reach = _tap_reach(kh, kw, dh, dw, sh, sw, pt, pl, h, w, out_h, out_w)
    if (kh * kw > 1 and (sh, sw) == (1, 1) and
        max(cin, self.features) <= self.xla_max_channels and
        _tap_density(reach, kh, kw, out_h, out_w) >= XLA_MIN_TAP_DENSITY):
      # Dense, narrow, stride 1 (ResNet layer1-3's 3x3 at small rates): XLA's
      # convolution is faster there, forward and backward.
      return self._xla_conv(x, kernel, bias, (1, 1), ((pt, pb), (pl, pr)),
                            (dh, dw))
    # Taps are summed in float32 (in bfloat16 too), as a convolution
    # accumulates internally.
    acc = jnp.promote_types(x.dtype, jnp.float32)
    # One split (its gradient is one concatenation), not kh * kw slices of
    # the kernel (whose gradients would be kh * kw padded kernel-size adds).
    taps = [t.reshape(cin, self.features) for t in jnp.split(
        kernel.reshape(kh * kw, cin, self.features), kh * kw, axis=0)]
    y = None
    for a, b, i0, i1, j0, j1 in reach:
      oa, ob = a * dh - pt, b * dw - pl
      xs = jax.lax.slice(
          x, (0, i0 * sh + oa, j0 * sw + ob, 0),
          (n, (i1 - 1) * sh + oa + 1, (j1 - 1) * sw + ob + 1, cin),
          (1, sh, sw, 1))
      z = tap_product(xs, taps[a * kw + b], self.precision, acc)
      if (i0, i1, j0, j1) != (0, out_h, 0, out_w):
        z = jnp.pad(z, ((0, 0), (i0, out_h - i1), (j0, out_w - j1), (0, 0)))
      y = z if y is None else y + z
    if y is None:        # every tap in the padding: the output is zero
      y = jnp.zeros((n, out_h, out_w, self.features), acc)
    y = y.astype(x.dtype)
    return y if bias is None else y + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def tap_product(x: Array, w: Array, precision=None, acc=jnp.float32) -> Array:
  """``x @ w`` over the channel axis: one tap of `MatmulConv`.

  Args:
    x: ``[..., cin]`` input pixels.
    w: ``[cin, cout]`` kernel slice.
    precision: `jax.lax.Precision` of the matmul.
    acc: accumulation (and output) dtype.

  Returns:
    ``[..., cout]`` in `acc`.

  The gradient is written out rather than left to autodiff for the kernel
  gradient ``x^T g``, which contracts the pixel axis that leads both
  operands. Left to itself, XLA:CPU feeds its matmul by writing the wider
  operand transposed, inside the fusion that produces it (the BatchNorm
  backward pass), at a fraction of memory speed. Here it is one rank-2
  product contracting dimension 0 of both operands, which XLA:CPU's dot
  takes as it stands: no transpose is written. (An explicit transpose of
  the narrower operand behind an optimisation barrier, used before, beat
  autodiff's form by 1.2x but costs 3-4% of a ResNet block's training step
  against this one: BENCHMARKS.md.)
  """
  return _tap_forward(x, w, precision, acc)


def _tap_forward(x, w, precision, acc):
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())),
                             precision=precision, preferred_element_type=acc)


def _tap_fwd(x, w, precision, acc):
  return _tap_forward(x, w, precision, acc), (x, w)


def _tap_bwd(precision, acc, residuals, g):
  x, w = residuals
  cin, cout = w.shape
  g = g.astype(x.dtype)
  dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())),
                           precision=precision, preferred_element_type=acc)
  dw = jax.lax.dot_general(x.reshape(-1, cin), g.reshape(-1, cout),
                           (((0,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=acc)
  return dx.astype(x.dtype), dw.astype(w.dtype)


tap_product.defvjp(_tap_fwd, _tap_bwd)


def _tap_reach(kh, kw, dh, dw, sh, sw, pt, pl, h, w, out_h, out_w):
  """``(a, b, i0, i1, j0, j1)`` for each tap that reaches a pixel.

  Tap ``(a, b)`` reads input pixels for outputs ``[i0, i1) x [j0, j1)``;
  taps that only ever see padding are left out.
  """
  reach = []
  for a in range(kh):
    i0, i1 = _valid_outputs(a * dh - pt, h, out_h, sh)
    for b in range(kw):
      j0, j1 = _valid_outputs(b * dw - pl, w, out_w, sw)
      if i1 > i0 and j1 > j0:
        reach.append((a, b, i0, i1, j0, j1))
  return reach


def _tap_density(reach, kh, kw, out_h, out_w):
  """Fraction of a dense convolution's products that touch real pixels."""
  valid = sum((i1 - i0) * (j1 - j0) for _, _, i0, i1, j0, j1 in reach)
  return valid / (kh * kw * out_h * out_w)


def resolve_conv_impl(conv_impl: str) -> str:
  """'xla', 'matmul' or 'taps' for ``conv_impl`` on the default backend."""
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl={conv_impl!r}; expected one of {CONV_IMPLS}')
  if conv_impl == 'auto':
    return 'matmul' if jax.default_backend() == 'cpu' else 'xla'
  return conv_impl


def conv_module(conv_impl: str = 'xla') -> ModuleDef:
  """`nn.Conv` or `MatmulConv` (same parameters) for ``conv_impl``."""
  impl = resolve_conv_impl(conv_impl)
  if impl == 'taps':
    return functools.partial(MatmulConv, xla_max_channels=0)
  return MatmulConv if impl == 'matmul' else nn.Conv
