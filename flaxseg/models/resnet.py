"""ResNet backbones (He et al., 2016) with atrous output strides.

Layout and parameter names follow torchvision's ``resnet*`` so weights import
by a table: ``conv1``, ``bn1`` (7x7/2 stem), a 3x3/2 max pool, then
``layer{1..4}_block{i}`` with ``conv1 bn1 conv2 bn2 [conv3 bn3]`` and, where
torchvision has a downsample, ``downsample_conv downsample_bn``. Bottleneck
blocks stride on the 3x3 convolution ("ResNet v1.5", as torchvision). The
fully connected classifier is omitted: these are segmentation backbones.

Output stride 16 or 8 replaces the stride of layer4 (and layer3) by dilation
exactly like torchvision's ``replace_stride_with_dilation``: the first block
of a dilated stage keeps the previous dilation, later blocks use the new one.
``multi_grid`` (DeepLab v3, Chen et al. 2017, sec. 3.2) multiplies the rate of
every layer4 block, first included, by unit rates such as (1, 2, 4).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.layers import (ModuleDef, canonicalize_dtype,
                                   computed_once, conv_kernel_init,
                                   conv_module, make_norm)

Array = jax.Array

#: Blocks per stage for each depth (He et al. 2016, table 1).
STAGE_SIZES = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
#: Output strides and the stages (layer2, layer3, layer4) whose stride becomes
#: dilation, as torchvision's ``replace_stride_with_dilation``.
DILATE_STAGES = {
    32: (False, False, False),
    16: (False, False, True),
    8: (False, True, True),
}


def is_bottleneck(depth: int) -> bool:
  """Whether `depth` uses Bottleneck blocks (expansion 4) or BasicBlocks."""
  return depth >= 50


def validate_config(depth: int, output_stride: int,
                    multi_grid: Optional[Sequence[int]] = None,
                    base_width: int = 64) -> None:
  """Raises ValueError for an unsupported ResNet configuration.

  Args:
    depth: ResNet depth.
    output_stride: ratio of input to layer4 resolution.
    multi_grid: unit rates for layer4, or None.
    base_width: channels of the stem.
  """
  if depth not in STAGE_SIZES:
    raise ValueError(f'depth={depth!r} is not supported; expected one of '
                     f'{sorted(STAGE_SIZES)}')
  if output_stride not in DILATE_STAGES:
    raise ValueError(f'output_stride={output_stride!r} is not supported; '
                     f'expected one of {sorted(DILATE_STAGES)}')
  if multi_grid is not None and (
      len(multi_grid) == 0 or any(int(u) < 1 for u in multi_grid)):
    raise ValueError(f'multi_grid={multi_grid!r} must be a non-empty sequence '
                     'of positive integers, or None')
  if not isinstance(base_width, int) or base_width < 1:
    raise ValueError(f'base_width={base_width!r} must be a positive integer')


def block_plan(depth: int, output_stride: int = 32,
               multi_grid: Optional[Sequence[int]] = None
               ) -> List[List[Tuple[int, int]]]:
  """The (stride, dilation) of the 3x3 convolution(s) of every block.

  Reproduces torchvision's ``ResNet._make_layer`` bookkeeping: a stage that is
  dilated gets stride 1 and multiplies the running dilation by 2; its first
  block uses the dilation before that multiplication. With `multi_grid`, block
  ``i`` of layer4 uses ``stage_rate * multi_grid[i % len(multi_grid)]``.

  Args:
    depth: ResNet depth (18, 34, 50, 101 or 152).
    output_stride: 8, 16 or 32.
    multi_grid: unit rates for layer4 (DeepLab v3 sec. 3.2), or None.

  Returns:
    One list per stage (layer1..layer4) of ``(stride, dilation)`` pairs.
  """
  validate_config(depth, output_stride, multi_grid)
  dilate = (False,) + DILATE_STAGES[output_stride]
  dilation = 1
  plan = []
  for stage, num_blocks in enumerate(STAGE_SIZES[depth]):
    stride = 1 if stage == 0 else 2
    previous = dilation
    if dilate[stage]:
      dilation *= stride
      stride = 1
    blocks = [(stride, previous)] + [(1, dilation)] * (num_blocks - 1)
    if stage == 3 and multi_grid is not None:
      blocks = [(s, dilation * int(multi_grid[i % len(multi_grid)]))
                for i, (s, _) in enumerate(blocks)]
    plan.append(blocks)
  return plan


def _pad(dilation: int, kernel: int = 3):
  p = dilation * (kernel - 1) // 2
  return ((p, p), (p, p))


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with an identity or projection shortcut.

  torchvision's BasicBlock (which refuses dilation > 1); here both 3x3
  convolutions use the block's dilation, padding = dilation.

  Attributes:
    planes: output channels.
    stride: stride of the first 3x3 convolution.
    dilation: dilation of both 3x3 convolutions.
    downsample: whether the shortcut is a 1x1 conv + BN projection.
    conv: convolution constructor.
    norm: normalisation constructor (see `make_norm`).
  """
  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  expansion = 1

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    ura = not train
    d = self.dilation
    y = self.conv(self.planes, (3, 3), (self.stride, self.stride),
                  padding=_pad(d), kernel_dilation=(d, d), name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y, use_running_average=ura))
    y = self.conv(self.planes, (3, 3), padding=_pad(d), kernel_dilation=(d, d),
                  name='conv2')(y)
    y = self.norm(name='bn2')(y, use_running_average=ura)
    if self.downsample:
      x = self.conv(self.planes, (1, 1), (self.stride, self.stride),
                    padding='VALID', name='downsample_conv')(x)
      x = self.norm(name='downsample_bn')(x, use_running_average=ura)
    return computed_once(nn.relu(x + y))


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided, dilated), 1x1 expand by 4, plus shortcut.

  Attributes:
    planes: channels of the 3x3 convolution; output has ``4 * planes``.
    stride: stride of the 3x3 convolution (torchvision / ResNet v1.5).
    dilation: dilation of the 3x3 convolution, padding = dilation.
    downsample: whether the shortcut is a 1x1 conv + BN projection.
    conv: convolution constructor.
    norm: normalisation constructor (see `make_norm`).
  """
  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm
  expansion = 4

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    ura = not train
    d = self.dilation
    y = self.conv(self.planes, (1, 1), padding='VALID', name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y, use_running_average=ura))
    y = self.conv(self.planes, (3, 3), (self.stride, self.stride),
                  padding=_pad(d), kernel_dilation=(d, d), name='conv2')(y)
    y = nn.relu(self.norm(name='bn2')(y, use_running_average=ura))
    y = self.conv(self.planes * 4, (1, 1), padding='VALID', name='conv3')(y)
    y = self.norm(name='bn3')(y, use_running_average=ura)
    if self.downsample:
      x = self.conv(self.planes * 4, (1, 1), (self.stride, self.stride),
                    padding='VALID', name='downsample_conv')(x)
      x = self.norm(name='downsample_bn')(x, use_running_average=ura)
    return computed_once(nn.relu(x + y))


class ResNet(nn.Module):
  """ResNet feature extractor in torchvision's layout.

  Attributes:
    depth: 18, 34 (BasicBlock), 50, 101, 152 (Bottleneck).
    base_width: stem channels; stage ``k`` has ``base_width * 2**k`` planes
      (64 in the paper; smaller for tiny test and demo models).
    output_stride: 32 (plain), 16 or 8 (strides replaced by dilation).
    multi_grid: unit rates for the layer4 blocks (DeepLab v3 sec. 3.2), e.g.
      (1, 2, 4); None keeps torchvision's rates.
    bn_momentum: Flax momentum (0.9 is PyTorch's 0.1).
    bn_axis_name: axis name for synchronised BatchNorm, or None.
    frozen_bn: use `FrozenBatchNorm` everywhere.
    dtype: computation dtype; parameters stay float32.
    remat: recompute each residual block's activations in the backward pass
      instead of keeping them (`recompute_in_backward`, which XLA:CPU
      cannot undo as it does ``nn.remat``): less memory, one more forward.
      Parameter names do not change.
    conv_impl: 'xla' (`nn.Conv`), 'matmul' (`MatmulConv`, per-tap matmuls,
      faster on XLA:CPU), 'taps' (per-tap matmuls only) or 'auto' (matmul on
      CPU only); same parameters.
    scan_blocks: run each run of identical consecutive blocks of a stage
      (same stride and dilation, no projection: 22 of ResNet-101's 23 layer3
      blocks) as one ``jax.lax.scan`` over their stacked variables, so that
      XLA traces and compiles one block body instead of each (see
      `run_plan`), the scan-over-layers that TPU/GPU codebases use against
      compile time. Parameter names and values do not change
      (``layer3_block{i}`` stays): checkpoints and imported weights load
      either way, and the outputs and gradients are the same. Off by
      default: on XLA:CPU it compiles slower and trains many times slower
      (the loop body's backward convolutions are left in a non-canonical
      form that XLA:CPU computes with its generic loop; BENCHMARKS.md), so
      a training apply (``train=True``) warns there; inference applies run
      about as fast as unrolled and do not warn. On TPU/GPU it is not yet
      measured.
  """
  depth: int = 50
  base_width: int = 64
  output_stride: int = 32
  multi_grid: Optional[Tuple[int, ...]] = None
  bn_momentum: float = 0.9
  bn_axis_name: Optional[str] = None
  frozen_bn: bool = False
  dtype: Any = jnp.float32
  remat: bool = False
  conv_impl: str = 'xla'
  scan_blocks: bool = False

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Dict[str, Array]:
    """Computes the feature pyramid.

    Args:
      x: images (N, H, W, 3).
      train: use batch statistics and update ``batch_stats``.

    Returns:
      Dict with ``'stem'`` (after conv1/bn1/relu, stride 2), ``'layer1'``
      (stride 4), ``'layer2'`` (8), ``'layer3'`` and ``'layer4'`` (16 and 32,
      or less with dilation), all in `dtype`.
    """
    validate_config(self.depth, self.output_stride, self.multi_grid,
                    self.base_width)
    dtype = canonicalize_dtype(self.dtype)
    conv = functools.partial(conv_module(self.conv_impl), use_bias=False,
                             dtype=dtype, kernel_init=conv_kernel_init)
    norm = make_norm(momentum=self.bn_momentum, axis_name=self.bn_axis_name,
                     frozen=self.frozen_bn, dtype=dtype)
    block_cls = Bottleneck if is_bottleneck(self.depth) else BasicBlock

    features = {}
    x = conv(self.base_width, (7, 7), (2, 2), padding=((3, 3), (3, 3)),
             name='conv1')(x)
    x = nn.relu(norm(name='bn1')(x, use_running_average=not train))
    features['stem'] = x
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    in_channels = self.base_width
    plan = block_plan(self.depth, self.output_stride, self.multi_grid)
    # Blocks are created one by one when initialising, so that every block
    # has its own variables under its torchvision name whatever
    # `scan_blocks` and `remat` say; afterwards scanned runs and
    # rematerialised blocks are applied unbound with those variables.
    scan = self.scan_blocks and not self.is_initializing()
    recompute = self.remat and not self.is_initializing()
    # Only training applies warn: on XLA:CPU the scanned forward pass runs
    # about as fast as the unrolled one (BENCHMARKS.md); the slow part is
    # the backward pass of the training step.
    if scan and train and jax.default_backend() == 'cpu':
      warnings.warn(CPU_SCAN_WARNING, RuntimeWarning, stacklevel=2)
    for stage, blocks in enumerate(plan):
      planes = self.base_width * 2**stage
      out_channels = planes * block_cls.expansion
      for first, count, downsample in run_plan(blocks, in_channels,
                                               out_channels, scan):
        stride, dilation = blocks[first]
        names = [f'layer{stage + 1}_block{i}'
                 for i in range(first, first + count)]
        make = functools.partial(block_cls, planes, stride=stride,
                                 dilation=dilation, downsample=downsample,
                                 conv=conv, norm=norm)
        if count > 1:
          x = self._scanned(make(parent=None), names, x, train)
        elif recompute:
          x = self._recomputed(make(parent=None), names[0], x, train)
        else:
          x = make(name=names[0])(x, train)
        in_channels = out_channels
      features[f'layer{stage + 1}'] = x
    return features

  def _block_variables(self, names: Sequence[str]):
    """Each of `names`' variables, and the collections to write back."""
    variables = self.variables
    missing = [n for n in names if n not in variables.get('params', {})]
    if missing:
      raise ValueError(f'ResNet {self.name!r} has no parameters for blocks '
                       f'{missing}')
    per_block = [{col: tree[name] for col, tree in variables.items()
                  if name in tree} for name in names]
    mutable = [col for col in per_block[0] if col != 'params'
               and self.is_mutable_collection(col)]
    return per_block, mutable

  def _recomputed(self, block: nn.Module, name: str, x: Array,
                  train: bool) -> Array:
    """Applies the unbound `block` with `name`'s variables, keeping only
    its input and variables for the backward pass (`recompute_in_backward`);
    updated BatchNorm statistics are written back under `name`."""
    (block_vars,), mutable = self._block_variables([name])
    params = block_vars['params']
    others = {col: v for col, v in block_vars.items() if col != 'params'}

    def fn(p, o, h):
      return _apply_unbound(block, {'params': p, **o}, h, train, mutable)

    x, updates = recompute_in_backward(fn)(params, others, x)
    for col in mutable:
      self.put_variable(col, name, updates[col])
    return x

  def _scanned(self, block: nn.Module, names: Sequence[str], x: Array,
               train: bool) -> Array:
    """Applies the unbound `block` with each of `names`' variables in turn.

    The blocks' variables (every collection that holds them) are stacked on
    a new leading axis and ``jax.lax.scan`` carries the activations through
    them; updated BatchNorm statistics are unstacked and written back under
    each block's own name. Gradients reach each block's parameters through
    the stack.
    """
    per_block, mutable = self._block_variables(names)
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *per_block)

    def body(h, block_vars):
      return _apply_unbound(block, block_vars, h, train, mutable)

    if self.remat:
      # As `nn.remat` on each block; inside a scan, CSE across iterations is
      # not a risk (jax.checkpoint's documentation).
      body = jax.checkpoint(body, prevent_cse=False)
    x, updates = jax.lax.scan(body, x, stacked)
    for col in mutable:
      for i, name in enumerate(names):
        self.put_variable(col, name,
                          jax.tree.map(lambda a, i=i: a[i], updates[col]))
    return x


def _apply_unbound(block: nn.Module, variables, x: Array, train: bool,
                   mutable: Sequence[str]):
  """`(output, updated mutable collections)` of the unbound `block`."""
  if not mutable:
    return block.apply(variables, x, train), {}
  return block.apply(variables, x, train, mutable=mutable)


def recompute_in_backward(fn):
  """`fn(params, others, x) -> (y, aux)`, with a backward pass that keeps
  only the arguments and recomputes `fn` from them.

  What ``jax.checkpoint`` (``nn.remat``) means, built so that no compiler
  pass can undo it: ``jax.checkpoint`` marks the recomputation with
  optimization barriers, which XLA:CPU removes early in its pipeline, after
  which common-subexpression elimination merges the recomputation back into
  the forward pass, so nothing is saved (BENCHMARKS.md). Here the
  recomputation reads `x` plus zero times one element of the output
  cotangent: it cannot be computed before the backward pass reaches the
  block, nor merged with the forward. Gradients reach `params` and `x`;
  `others` (BatchNorm statistics) and `aux` (their updates) get none. (If
  that cotangent element is not finite, the block's whole gradient is NaN;
  the step's gradient is not finite then either way.) Forward-mode
  differentiation (``jax.jvp``) is not supported, as for any
  ``jax.custom_vjp``.
  """

  @jax.custom_vjp
  def f(params, others, x):
    return fn(params, others, x)

  def forward(params, others, x):
    return fn(params, others, x), (params, others, x)

  def backward(residuals, cotangents):
    params, others, x = residuals
    g = cotangents[0]
    tied = x + (jnp.ravel(g)[0] * 0).astype(x.dtype)
    _, pull = jax.vjp(lambda p, h: fn(p, others, h)[0], params, tied)
    d_params, d_x = pull(g)
    return d_params, jax.tree.map(jnp.zeros_like, others), d_x

  f.defvjp(forward, backward)
  return f


CPU_SCAN_WARNING = (
    'ResNet scan_blocks=True on XLA:CPU: the scanned training step compiles '
    'about 2x and runs up to ~18x slower than the unrolled one (the loop '
    "body's backward convolutions miss XLA:CPU's fast path; BENCHMARKS.md, "
    '"Scanning the repeated blocks"). It is meant for TPU/GPU.')


def run_plan(blocks: Sequence[Tuple[int, int]], in_channels: int,
             out_channels: int, scan: bool) -> List[Tuple[int, int, bool]]:
  """Splits a stage's blocks into runs computed at once.

  Without `scan` every block is its own run. With it, a run is a maximal
  sequence of consecutive blocks of the same ``(stride, dilation)`` that
  includes no projection shortcut: such blocks have the same variable shapes
  and compute the same function of them, so one scan body serves them all.
  A block with a projection shortcut stays alone: torchvision gives the
  first block of a stage one whenever it changes the shape, and keeps it
  where dilation has replaced the stride.

  Args:
    blocks: the stage's ``(stride, dilation)`` pairs (`block_plan`).
    in_channels: channels entering the stage.
    out_channels: channels every block of the stage outputs.
    scan: whether runs of more than one block are wanted.

  Returns:
    ``(first block index, number of blocks, projection shortcut)`` for each
    run, covering the stage in order.
  """
  runs = []
  i = 0
  while i < len(blocks):
    projects = i == 0 and (blocks[0][0] != 1 or in_channels != out_channels)
    count = 1
    if scan and not projects:
      while i + count < len(blocks) and blocks[i + count] == blocks[i]:
        count += 1
    runs.append((i, count, projects))
    i += count
  return runs
