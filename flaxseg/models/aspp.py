"""Atrous Spatial Pyramid Pooling with image-level features.

DeepLab v3 (Chen et al. 2017, sec. 3.3): a 1x1 convolution, three 3x3 atrous
convolutions and an image-level branch (global average pool, 1x1 conv, BN,
ReLU, bilinear upsampling back to the feature size), every convolution without
bias and followed by BatchNorm and ReLU; the five branches are concatenated and
projected by a 1x1 conv + BN + ReLU, then dropout. Rates (6, 12, 18) at output
stride 16, doubled at output stride 8 (sec. 3.3 and table 4).

Parameter names map onto torchvision's ``DeepLabHead[0]`` (``ASPP``)::

  conv1x1_{conv,bn}     convs.0.{0,1}
  atrous{k}_{conv,bn}   convs.{k+1}.{0,1}
  pool_{conv,bn}        convs.4.{1,2}
  project_{conv,bn}     project.{0,1}
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.layers import (canonicalize_dtype, conv_kernel_init,
                                   conv_module, make_norm, output_dtype)

Array = jax.Array

#: Paper rates at output stride 16 (DeepLab v3 sec. 3.3).
PAPER_RATES_OS16 = (6, 12, 18)


def scale_rates(rates: Sequence[int], from_stride: int,
                to_stride: int) -> Tuple[int, ...]:
  """Rescales atrous rates so their field of view in input pixels is kept.

  Args:
    rates: rates valid at output stride `from_stride`.
    from_stride: output stride the rates were chosen for.
    to_stride: output stride to use them at.

  Returns:
    ``rate * from_stride / to_stride`` for each rate (e.g. (6, 12, 18) at 16
    becomes (12, 24, 36) at 8 and (3, 6, 9) at 32).

  Raises:
    ValueError: if a rescaled rate is not a positive integer.
  """
  out = []
  for r in rates:
    scaled = r * from_stride / to_stride
    if scaled < 1 or scaled != int(scaled):
      raise ValueError(f'atrous rate {r} at output stride {from_stride} does '
                       f'not give an integer rate at output stride {to_stride}')
    out.append(int(scaled))
  return tuple(out)


class ASPP(nn.Module):
  """ASPP with image pooling (DeepLab v3 sec. 3.3).

  Attributes:
    rates: atrous rates of the three 3x3 branches.
    width: channels of every branch and of the projection (256 in the paper).
    dropout: dropout rate after the projection (torchvision 0.5; TF DeepLab
      keep_prob 0.9, i.e. 0.1).
    bn_momentum: Flax BatchNorm momentum.
    bn_axis_name: axis name for synchronised BatchNorm, or None.
    frozen_bn: use `FrozenBatchNorm`.
    dtype: computation dtype; parameters stay float32.
    conv_impl: convolution implementation (`layers.conv_module`).
  """
  rates: Tuple[int, ...] = PAPER_RATES_OS16
  width: int = 256
  dropout: float = 0.1
  bn_momentum: float = 0.9
  bn_axis_name: Optional[str] = None
  frozen_bn: bool = False
  dtype: Any = jnp.float32
  conv_impl: str = 'xla'

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """Applies ASPP.

    Args:
      x: features (N, H, W, C).
      train: batch statistics, ``batch_stats`` updates and dropout
        (``'dropout'`` rng) on.

    Returns:
      (N, H, W, width) features in `dtype`.
    """
    dtype = canonicalize_dtype(self.dtype)
    conv = functools.partial(conv_module(self.conv_impl), self.width,
                             use_bias=False, dtype=dtype,
                             kernel_init=conv_kernel_init)
    norm = make_norm(momentum=self.bn_momentum, axis_name=self.bn_axis_name,
                     frozen=self.frozen_bn, dtype=dtype)
    ura = not train

    def conv_bn_relu(y, prefix, **conv_kwargs):
      y = conv(name=f'{prefix}_conv', **conv_kwargs)(y)
      return nn.relu(norm(name=f'{prefix}_bn')(y, use_running_average=ura))

    branches = [conv_bn_relu(x, 'conv1x1', kernel_size=(1, 1),
                             padding='VALID')]
    for k, r in enumerate(self.rates):
      branches.append(conv_bn_relu(
          x, f'atrous{k}', kernel_size=(3, 3), padding=((r, r), (r, r)),
          kernel_dilation=(r, r)))
    # Average in float32: a bf16 sum over a large map loses precision.
    pooled = jnp.mean(x.astype(output_dtype(dtype)), axis=(1, 2),
                      keepdims=True)
    pooled = conv_bn_relu(pooled.astype(dtype), 'pool', kernel_size=(1, 1),
                          padding='VALID')
    # Bilinear upsampling of a 1x1 map (torchvision's ASPPPooling) is a
    # broadcast, for either corner convention.
    branches.append(jnp.broadcast_to(
        pooled, x.shape[:3] + (pooled.shape[-1],)))

    y = jnp.concatenate(branches, axis=-1)
    y = conv_bn_relu(y, 'project', kernel_size=(1, 1), padding='VALID')
    return nn.Dropout(self.dropout, deterministic=not train)(y)
