"""Tests for flaxseg.models.resnet: layout, strides, dilation, names.

Shapes and configurations are checked with `jax.eval_shape` (tracing only), so
even ResNet-101 costs no compute.
"""

import contextlib
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from flaxseg.models import layers
from flaxseg.models import resnet


def _abstract_init(model, size=(1, 64, 64, 3)):
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(size))


def _num_params(variables):
  return sum(x.size for x in jax.tree.leaves(variables['params']))


def _conv_calls(model, size):
  """Records each nn.Conv: path -> (strides, dilation, out shape, init)."""
  records = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    mod = context.module
    if isinstance(mod, nn.Conv) and context.method_name == '__call__':
      as_pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)
      records['/'.join(mod.path)] = (as_pair(mod.strides),
                                     as_pair(mod.kernel_dilation), out.shape,
                                     mod.kernel_init)
    return out

  with nn.intercept_methods(interceptor):
    _abstract_init(model, size)
  return records


# torchvision resnet*(num_classes=1000) counts minus the fc layer.
@pytest.mark.parametrize('depth,count', [
    (18, 11_689_512 - 513_000),
    (34, 21_797_672 - 513_000),
    (50, 25_557_032 - 2_049_000),
    (101, 44_549_160 - 2_049_000),
    (152, 60_192_808 - 2_049_000),
])
def test_param_counts_match_torchvision(depth, count):
  assert _num_params(_abstract_init(resnet.ResNet(depth=depth))) == count


def test_parameter_names_follow_torchvision():
  params = _abstract_init(resnet.ResNet(depth=50))['params']
  assert set(params) == {'conv1', 'bn1'} | {
      f'layer{s + 1}_block{i}' for s, n in enumerate((3, 4, 6, 3))
      for i in range(n)}
  assert set(params['layer1_block0']) == {
      'conv1', 'bn1', 'conv2', 'bn2', 'conv3', 'bn3', 'downsample_conv',
      'downsample_bn'}
  assert 'downsample_conv' not in params['layer1_block1']
  assert set(params['layer1_block0']['bn1']) == {'scale', 'bias'}
  assert params['layer3_block5']['conv2']['kernel'].shape == (3, 3, 256, 256)
  basic = _abstract_init(resnet.ResNet(depth=18))['params']
  # BasicBlock: no projection in layer1 (64 -> 64), one in later stages.
  assert set(basic['layer1_block0']) == {'conv1', 'bn1', 'conv2', 'bn2'}
  assert 'downsample_conv' in basic['layer2_block0']


@pytest.mark.parametrize('output_stride', [8, 16, 32])
def test_feature_shapes(output_stride):
  # 257 x 321 follows torch's floor((n + 2p - k) / s) + 1 arithmetic:
  # stem 129x161, layer1 65x81, layer2 33x41, then 17x21, 9x11 unless dilated.
  out = jax.eval_shape(
      resnet.ResNet(depth=50, output_stride=output_stride).init_with_output,
      jax.random.key(0), jnp.zeros((2, 257, 321, 3)))[0]
  sizes = {4: (65, 81), 8: (33, 41), 16: (17, 21), 32: (9, 11)}
  assert out['stem'].shape == (2, 129, 161, 64)
  assert out['layer1'].shape == (2, *sizes[4], 256)
  assert out['layer2'].shape == (2, *sizes[8], 512)
  assert out['layer3'].shape == (2, *sizes[min(16, output_stride)], 1024)
  assert out['layer4'].shape == (2, *sizes[output_stride], 2048)


# torchvision._make_layer with replace_stride_with_dilation: the first block of
# a dilated stage keeps the previous dilation.
PLANS = {
    32: [[(1, 1)] * 3, [(2, 1)] + [(1, 1)] * 3, [(2, 1)] + [(1, 1)] * 5,
         [(2, 1), (1, 1), (1, 1)]],
    16: [[(1, 1)] * 3, [(2, 1)] + [(1, 1)] * 3, [(2, 1)] + [(1, 1)] * 5,
         [(1, 1), (1, 2), (1, 2)]],
    8: [[(1, 1)] * 3, [(2, 1)] + [(1, 1)] * 3, [(1, 1)] + [(1, 2)] * 5,
        [(1, 2), (1, 4), (1, 4)]],
}


@pytest.mark.parametrize('output_stride', [8, 16, 32])
def test_block_plan_matches_torchvision(output_stride):
  assert resnet.block_plan(50, output_stride) == PLANS[output_stride]


@pytest.mark.parametrize('output_stride,rates', [
    (32, (1, 2, 4)), (16, (2, 4, 8)), (8, (4, 8, 16))])
def test_multi_grid_rates(output_stride, rates):
  plan = resnet.block_plan(50, output_stride, multi_grid=(1, 2, 4))
  assert tuple(d for _, d in plan[3]) == rates
  assert plan[:3] == PLANS[output_stride][:3]  # Only layer4 changes.
  # Cyclic when layer4 has more blocks than unit rates.
  plan = resnet.block_plan(50, 16, multi_grid=(1, 2))
  assert [d for _, d in plan[3]] == [2, 4, 2]
  plan = resnet.block_plan(18, 16, multi_grid=(1, 2, 4))
  assert [d for _, d in plan[3]] == [2, 4]


def test_os8_convs_dilated_and_stride_free():
  calls = _conv_calls(resnet.ResNet(depth=50, output_stride=8,
                                    multi_grid=(1, 2, 4)), (1, 65, 65, 3))
  # Every layer3 / layer4 conv keeps the 1/8 resolution (65 -> 9).
  for path, (strides, dilation, shape, _) in calls.items():
    if path.startswith(('layer3', 'layer4')):
      assert strides == (1, 1) and shape[1:3] == (9, 9), path
  assert calls['layer3_block0/conv2'][1] == (1, 1)
  assert calls['layer3_block1/conv2'][1] == (2, 2)
  assert [calls[f'layer4_block{i}/conv2'][1] for i in range(3)] == [
      (4, 4), (8, 8), (16, 16)]
  # 1x1 convolutions are never dilated; the projections stay (stride 1).
  assert calls['layer4_block1/conv1'][1] == (1, 1)
  assert calls['layer3_block0/downsample_conv'][:2] == ((1, 1), (1, 1))
  assert calls['layer2_block0/conv2'][0] == (2, 2)
  assert all(init is layers.conv_kernel_init for *_, init in calls.values())


def test_basic_block_dilation():
  calls = _conv_calls(resnet.ResNet(depth=18, output_stride=8),
                      (1, 65, 65, 3))
  assert calls['layer4_block1/conv1'][1] == (4, 4)
  assert calls['layer4_block1/conv2'][1] == (4, 4)
  assert calls['layer4_block0/conv1'][2][1:3] == (9, 9)


def test_base_width_and_dtype():
  model = resnet.ResNet(depth=18, base_width=8, dtype='bfloat16')
  out, variables = jax.eval_shape(model.init_with_output, jax.random.key(0),
                                  jnp.zeros((1, 32, 32, 3)))
  assert [out[f'layer{i}'].shape[-1] for i in range(1, 5)] == [8, 16, 32, 64]
  assert all(v.dtype == jnp.bfloat16 for v in out.values())
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))


def test_frozen_bn_everywhere():
  calls = []

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == '__call__':
      calls.append(type(context.module))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    _abstract_init(resnet.ResNet(depth=18, frozen_bn=True))
  assert layers.FrozenBatchNorm in calls and nn.BatchNorm not in calls


@pytest.mark.parametrize('kwargs,match', [
    (dict(depth=42), 'depth=42'),
    (dict(output_stride=4), 'output_stride=4'),
    (dict(multi_grid=(1, 0)), 'multi_grid'),
    (dict(base_width=0), 'base_width=0'),
])
def test_bad_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _abstract_init(resnet.ResNet(**kwargs))


def _largest_fusion(depth, train=True):
  """Most operands of any fusion in a tiny ResNet's compiled gradient
  (``train``) or inference forward pass."""
  import re  # pylint: disable=g-import-not-at-top
  model = resnet.ResNet(depth=depth, base_width=4, output_stride=8)
  x = jnp.ones((2, 33, 33, 3))
  variables = model.init(jax.random.key(0), x)

  def loss(params, x):
    feats, _ = model.apply({'params': params,
                            'batch_stats': variables['batch_stats']}, x,
                           train=True, mutable=['batch_stats'])
    return jnp.sum(jnp.square(feats['layer4']))
  if train:
    lowered = jax.jit(jax.grad(loss)).lower(variables['params'], x)
  else:
    lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)[
        'layer4']).lower(variables, x)
  hlo = lowered.compile().as_text()
  entry = hlo[hlo.index('\nENTRY'):]
  return max(len(m.group(1).split(','))
             for m in re.finditer(r' fusion\(([^)]*)\)', entry))


def test_residual_stream_is_computed_once_per_block(monkeypatch):
  """XLA:CPU would rebuild the chain of earlier blocks' outputs inside each
  block's fusion (ResNet-101's 23 layer3 blocks: work quadratic in depth);
  `layers.computed_once` on each block's output stops it."""
  if jax.default_backend() != 'cpu':
    pytest.skip('the duplication is XLA:CPU fusion')
  # Inference too, where a division by a broadcast 1.0 did not survive
  # (XLA rewrote it as a multiply and duplicated that): 143 operands.
  assert _largest_fusion(101) < 25
  assert _largest_fusion(101, train=False) < 25
  # Without it, on this XLA, the chain is there (so the checks above can
  # fail): one fusion reads the outputs of every layer3 block.
  monkeypatch.setattr(resnet, 'computed_once', lambda x: x)
  assert _largest_fusion(101) > 60
  assert _largest_fusion(101, train=False) > 60


@pytest.mark.parametrize('depth,output_stride,multi_grid,runs', [
    # ResNet-101 at OS 8: each stage's projection block alone, then one run
    # of all the identical blocks after it (layer3: 22 of 23).
    (101, 8, None, [[(0, 1, True), (1, 2, False)],
                    [(0, 1, True), (1, 3, False)],
                    [(0, 1, True), (1, 22, False)],
                    [(0, 1, True), (1, 2, False)]]),
    # Multi-grid gives every layer4 block its own rate: nothing to scan.
    (50, 16, (1, 2, 4), [[(0, 1, True), (1, 2, False)],
                         [(0, 1, True), (1, 3, False)],
                         [(0, 1, True), (1, 5, False)],
                         [(0, 1, True), (1, 1, False), (2, 1, False)]]),
    # ResNet-18's layer1 keeps its shape: no projection, one run of two.
    (18, 32, None, [[(0, 2, False)]] + [[(0, 1, True), (1, 1, False)]] * 3),
])
def test_run_plan(depth, output_stride, multi_grid, runs):
  stages = resnet.block_plan(depth, output_stride, multi_grid)
  expansion = 4 if resnet.is_bottleneck(depth) else 1
  got, in_channels = [], 64
  for s, blocks in enumerate(stages):
    out_channels = 64 * 2**s * expansion
    got.append(resnet.run_plan(blocks, in_channels, out_channels, scan=True))
    in_channels = out_channels
  assert got == runs
  # Without scanning, every block is its own run.
  assert [[c for _, c, _ in resnet.run_plan(blocks, 1, 2, scan=False)]
          for blocks in stages] == [[1] * len(b) for b in stages]


def _scan_results(scan, remat=False, depth=50, output_stride=8):
  """Init variables, eval features, updated BatchNorm statistics, loss and
  parameter gradients of a tiny ResNet, with or without `scan_blocks`."""
  model = resnet.ResNet(depth=depth, base_width=4, output_stride=output_stride,
                        scan_blocks=scan, remat=remat)
  x = jax.random.normal(jax.random.key(1), (2, 33, 33, 3))
  variables = jax.jit(model.init)(jax.random.key(0), x)

  def loss(params):
    feats, updates = model.apply(
        {'params': params, 'batch_stats': variables['batch_stats']}, x,
        train=True, mutable=['batch_stats'])
    return jnp.mean(jnp.square(feats['layer4'])), updates

  (value, updates), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      variables['params'])
  features = jax.jit(lambda v: model.apply(v, x))(variables)
  jaxpr = str(jax.make_jaxpr(loss)(variables['params']))
  return variables, features, updates, value, grads, jaxpr


@pytest.mark.parametrize('remat', [False, True])
def test_scan_blocks_keeps_names_outputs_statistics_and_gradients(remat):
  import numpy as np  # pylint: disable=g-import-not-at-top
  v0, f0, u0, l0, g0, jaxpr0 = _scan_results(False, remat)
  warns = (pytest.warns(RuntimeWarning, match='scan_blocks=True on XLA:CPU')
           if jax.default_backend() == 'cpu' else contextlib.nullcontext())
  with warns:
    v1, f1, u1, l1, g1, jaxpr1 = _scan_results(True, remat)
  # Same variables under the same names (created block by block).
  assert jax.tree.structure(v0) == jax.tree.structure(v1)
  jax.tree.map(np.testing.assert_array_equal, v0, v1)
  # ResNet-50 at OS 8: layer1..layer4 each scan the blocks after the first.
  assert 'scan' not in jaxpr0
  assert jaxpr1.count('scan[') == 4
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
  jax.tree.map(close, f0, f1)
  # Every block's running statistics are updated, under its own name.
  assert jax.tree.structure(u0) == jax.tree.structure(u1)
  jax.tree.map(close, u0, u1)
  assert not np.allclose(u1['batch_stats']['layer3_block4']['bn2']['mean'],
                         v1['batch_stats']['layer3_block4']['bn2']['mean'])
  close(l0, l1)
  # Gradients are sums over pixels that XLA may order differently in a loop
  # body: compared at 1e-5 of each tensor's largest entry.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max())), g0, g1)
  assert float(jnp.abs(g1['layer3_block5']['conv2']['kernel']).max()) > 0


def test_remat_lowers_compiled_memory_with_the_same_gradients():
  """`remat` keeps only each block's input for the backward pass, in the
  compiled program (XLA:CPU undoes ``nn.remat``; `recompute_in_backward`
  cannot be undone), with the same loss and gradients."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(1), (2, 33, 33, 3))
  temps, results = [], []
  for remat in (False, True):
    model = resnet.ResNet(depth=50, base_width=8, output_stride=8,
                          remat=remat)
    variables = jax.jit(model.init)(jax.random.key(0), x)

    def loss(params, model=model, variables=variables):
      feats, _ = model.apply(
          {'params': params, 'batch_stats': variables['batch_stats']}, x,
          train=True, mutable=['batch_stats'])
      return jnp.mean(jnp.square(feats['layer4']))

    fn = jax.jit(jax.value_and_grad(loss))
    memory = fn.lower(variables['params']).compile().memory_analysis()
    if memory is not None:
      temps.append(memory.temp_size_in_bytes)
    results.append(fn(variables['params']))
  if temps:
    assert temps[1] < 0.6 * temps[0], temps
  (l0, g0), (l1, g1) = results
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max())), g0, g1)


def test_scan_blocks_warns_on_cpu_for_training_applies_only():
  model = resnet.ResNet(depth=18, base_width=4, scan_blocks=True)
  x = jnp.zeros((1, 32, 32, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  with warnings.catch_warnings():
    warnings.filterwarnings('error', message='ResNet scan_blocks')
    jax.eval_shape(lambda v: model.apply(v, x), variables)  # train=False
  warns = (pytest.warns(RuntimeWarning, match='scan_blocks=True on XLA:CPU')
           if jax.default_backend() == 'cpu' else contextlib.nullcontext())
  with warns:
    jax.eval_shape(lambda v: model.apply(v, x, train=True,
                                         mutable=['batch_stats']), variables)


@pytest.mark.filterwarnings('ignore:ResNet scan_blocks')
def test_scan_blocks_without_parameters_names_the_blocks():
  model = resnet.ResNet(depth=18, base_width=4, scan_blocks=True)
  x = jnp.zeros((1, 32, 32, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  params = dict(variables['params'])
  del params['layer1_block1']
  with pytest.raises(ValueError, match=r"\['layer1_block1'\]"):
    jax.eval_shape(lambda v: model.apply(v, x),
                   {'params': params, 'batch_stats': variables['batch_stats']})
