"""Numerical parity with torchvision (optional dependency: the parity extra).

Each torchvision model is built with random weights (and random BatchNorm
statistics, so that they matter), put in eval mode, written with
``torch.save`` and read back through flaxseg's importer; both run the same
input, at an even size and at an odd one (257x321), and the relative error
``||ours - ref|| / ||ref||`` must be at most 1e-5 in float32. One training
step (BatchNorm in training mode, dropout off) gives the same loss and the
same gradients.
"""

import numpy as np
import pytest

torch = pytest.importorskip(
    'torch', reason='torch/torchvision are the parity reference: '
    "pip install -e '.[parity]' (CI installs it)")
torchvision = pytest.importorskip('torchvision', reason='pip install -e .[parity]')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

from flaxseg import convert, losses, models  # pylint: disable=g-import-not-at-top,wrong-import-position
from flaxseg.convert import tables  # pylint: disable=g-import-not-at-top,wrong-import-position
from flaxseg.models import layers, resnet, vgg  # pylint: disable=g-import-not-at-top,wrong-import-position

SIZES = ((160, 224), (257, 321))
TOL = 1e-5


def randomize(module, seed=0):
  """Random weights and BatchNorm statistics, eval mode."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen)
                             * 0.1)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen)
                            + 0.5)
  return module.eval()


def saved_state_dict(module, tmp_path, name):
  """The module's state dict through a real .pth file and the reader."""
  path = str(tmp_path / f'{name}.pth')
  torch.save(module.state_dict(), path)
  return convert.load_state_dict(path)


def image(size, seed=0):
  return np.random.default_rng(seed).normal(size=(1, 3) + size).astype(
      np.float32)


def nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def rel(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize('depth', [50, 101])
def test_resnet_features(depth, tmp_path):
  net = randomize(getattr(torchvision.models, f'resnet{depth}')(weights=None))
  sd = saved_state_dict(net, tmp_path, f'resnet{depth}')
  variables = convert.import_backbone(sd, f'resnet{depth}')
  variables = {c: variables[c]['backbone'] for c in variables}
  ours_fn = jax.jit(lambda v, x: resnet.ResNet(depth=depth).apply(v, x))
  for size in SIZES:
    x = image(size)
    with torch.no_grad():
      t = torch.from_numpy(x)
      t = net.maxpool(net.relu(net.bn1(net.conv1(t))))
      refs = {}
      for stage in range(1, 5):
        t = getattr(net, f'layer{stage}')(t)
        refs[f'layer{stage}'] = t.numpy()
    ours = ours_fn(variables, jnp.asarray(nhwc(x)))
    for key, ref in refs.items():
      err = rel(ours[key], nhwc(ref))
      print(f'resnet{depth} {size} {key}: relative error {err:.2e}')
      assert err <= TOL, (depth, size, key)


def test_vgg16_features(tmp_path):
  net = randomize(torchvision.models.vgg16(weights=None))
  sd = saved_state_dict(net, tmp_path, 'vgg16')
  variables = convert.import_backbone(sd, 'vgg16')
  params = {k: v for k, v in variables['params']['backbone'].items()
            if not k.startswith('fc')}
  ours_fn = jax.jit(lambda p, x: vgg.VGG16(style='fcn', include_fc=False)
                    .apply({'params': p}, x))
  for size in SIZES:
    if size[0] % 2:
      # flaxseg's VGG pools as Caffe does (ceil mode, as the FCN and
      # DeepLab nets were trained); torchvision's floor mode only differs on
      # odd sizes, so compare with the same module in ceil mode there.
      for m in net.features:
        if isinstance(m, torch.nn.MaxPool2d):
          m.ceil_mode = True
    x = image(size, seed=1)
    with torch.no_grad():
      ref = net.features(torch.from_numpy(x)).numpy()
    err = rel(ours_fn(params, jnp.asarray(nhwc(x)))['pool5'], nhwc(ref))
    print(f'vgg16 {size} pool5: relative error {err:.2e}')
    assert err <= TOL
  # The classifier's fc6/fc7 as convolutions give its Linear layers' output.
  with torch.no_grad():
    pool5 = torch.randn(1, 512, 7, 7, generator=torch.Generator().manual_seed(2))
    ref = net.classifier[3](net.classifier[1](net.classifier[0](
        torch.flatten(pool5, 1)))).numpy()
  fc = variables['params']['backbone']
  y = jax.lax.conv_general_dilated(
      jnp.asarray(nhwc(pool5.numpy())), fc['fc6']['kernel'], (1, 1), 'VALID',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + fc['fc6']['bias']
  y = jnp.maximum(y, 0.0)[:, 0, 0] @ fc['fc7']['kernel'][0, 0] + fc['fc7']['bias']
  assert rel(y, ref) <= TOL


@pytest.mark.parametrize('name', ['fcn_resnet50', 'fcn_resnet101',
                                  'deeplabv3_resnet50', 'deeplabv3_resnet101'])
def test_segmentation_models(name, tmp_path):
  net = randomize(getattr(torchvision.models.segmentation, name)(
      weights=None, weights_backbone=None, num_classes=21, aux_loss=True))
  sd = saved_state_dict(net, tmp_path, name)
  variables, kwargs = convert.import_model(sd, name)
  assert kwargs == {'name': tables.MODELS[name], 'num_classes': 21,
                    'aux': True}
  model = models.create_model(kwargs['name'], num_classes=21, aux=True)
  apply = jax.jit(model.apply)
  for size in SIZES:
    x = image(size, seed=3)
    with torch.no_grad():
      ref = net(torch.from_numpy(x))
    logits, aux = apply(variables, jnp.asarray(nhwc(x)))
    assert logits.shape == (1,) + size + (21,)
    errs = (rel(logits, nhwc(ref['out'])), rel(aux['aux_logits'],
                                               nhwc(ref['aux'])))
    print(f'{name} {size}: relative error out {errs[0]:.2e}, aux '
          f'{errs[1]:.2e}')
    assert max(errs) <= TOL, (name, size, errs)
  # Without the auxiliary head: the same main output.
  plain, kw = convert.import_model(sd, name, aux=False)
  assert not kw['aux'] and 'aux_classifier' not in plain['params']


def test_importer_error_for_a_truncated_or_mismatched_state_dict(tmp_path):
  net = torchvision.models.segmentation.fcn_resnet50(
      weights=None, weights_backbone=None, num_classes=21, aux_loss=False)
  sd = net.state_dict()
  truncated = dict(list(sd.items())[:len(sd) // 2])
  path = str(tmp_path / 'truncated.pth')
  torch.save(truncated, path)
  with pytest.raises(convert.ConversionError) as e:
    convert.import_model(convert.load_state_dict(path), 'fcn_resnet50',
                         num_classes=21, source=path)
  assert 'truncated.pth does not fit the model' in str(e.value)
  assert 'missing: classifier.4.weight' in str(e.value)
  assert 'missing: backbone.layer4.2.conv3.weight' in str(e.value)
  # A DeepLab v3 state dict given as FCN: the ASPP tensors are unexpected and
  # FCN's head tensors missing.
  dl = torchvision.models.segmentation.deeplabv3_resnet50(
      weights=None, weights_backbone=None, num_classes=21, aux_loss=False)
  with pytest.raises(convert.ConversionError) as e:
    convert.import_model({k: v.numpy() for k, v in dl.state_dict().items()},
                         'fcn_resnet50')
  assert 'unexpected: classifier.0.convs.0.0.weight' in str(e.value)
  assert 'missing: classifier.0.weight' in str(e.value)
  assert 'classifier.1.weight: shape (256, 256, 3, 3) does not fit' in str(
      e.value)
  # A corrupt file is named.
  with open(path, 'r+b') as f:
    f.truncate(1000)
  with pytest.raises(convert.ConversionError, match='truncated.pth'):
    convert.load_state_dict(path)


def test_bilinear_resize_matches_interpolate():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(2, 3, 17, 23)).astype(np.float32)
  for size in ((65, 97), (9, 11), (17, 50), (1, 1)):
    for align in (False, True):
      ref = torch.nn.functional.interpolate(
          torch.from_numpy(x), size=size, mode='bilinear',
          align_corners=align).numpy()
      ours = layers.resize_bilinear(jnp.asarray(nhwc(x)), size,
                                    align_corners=align)
      np.testing.assert_allclose(ours, nhwc(ref), rtol=1e-5, atol=1e-5,
                                 err_msg=f'{size} align_corners={align}')


def _global_rel(ours, ref):
  a, b = jax.tree.leaves(ours), jax.tree.leaves(ref)
  assert len(a) == len(b)
  err = sum(np.sum((np.asarray(p, np.float64) - np.asarray(q, np.float64)) ** 2)
            for p, q in zip(a, b))
  return float(np.sqrt(err / sum(np.sum(np.asarray(q, np.float64) ** 2)
                                 for q in b)))


def test_training_step_same_loss_and_gradients(tmp_path):
  """deeplabv3_resnet50 with the auxiliary head, BatchNorm in training mode,
  dropout off: torchvision's reference loss (out + 0.5 aux, cross-entropy
  ignoring 255) and its gradients against flaxseg's.

  In float64 the two agree to 1e-6 (measured 2.6e-8, loss 4e-16): the same
  function and the same gradient. In float32 the losses agree to 1e-5, but
  this step is ill-conditioned (random weights, train-mode BatchNorm on a
  2-image batch, ASPP pooling normalised over two 1x1 maps): torchvision's
  own float32 gradient is 1.8% from the float64 one and flaxseg's 2.5%; so
  float32 is checked against the float64 truth, at most twice torchvision's
  own error.
  """
  name = 'deeplabv3_resnet50'
  torch.manual_seed(0)
  net = randomize(torchvision.models.segmentation.deeplabv3_resnet50(
      weights=None, weights_backbone=None, num_classes=5, aux_loss=True))
  sd = saved_state_dict(net, tmp_path, name)
  variables, _ = convert.import_model(sd, name)
  rng = np.random.default_rng(5)
  size = (65, 81)
  x = rng.normal(size=(2, 3) + size).astype(np.float32)
  x[1] = 1.5 * x[1] + 0.5
  labels = rng.integers(0, 5, (2,) + size)
  labels[:, :7] = 255

  net.train()
  for m in net.modules():
    if isinstance(m, torch.nn.Dropout):
      m.p = 0.0

  def torch_step(dtype):
    net.to(dtype)
    net.zero_grad()
    out = net(torch.from_numpy(x).to(dtype))
    target = torch.from_numpy(labels)
    ce = lambda o: torch.nn.functional.cross_entropy(o, target,
                                                     ignore_index=255)
    loss = ce(out['out']) + 0.5 * ce(out['aux'])
    loss.backward()
    # Gradients through the importer's table (running stats as stand-ins).
    grads = {k: p.grad.double().numpy() for k, p in net.named_parameters()}
    grads.update({k: b.double().numpy() for k, b in net.named_buffers()})
    return loss.item(), convert.import_model(grads, name)[0]['params']

  def flax_step(dtype):
    model = models.create_model('deeplabv3_resnet50_tv', num_classes=5,
                                aux=True, aspp_dropout=0.0, aux_dropout=0.0,
                                dtype=dtype)
    v = jax.tree.map(lambda a: jnp.asarray(a, dtype), variables)

    def loss_fn(params):
      (logits, aux), _ = model.apply(
          {'params': params, 'batch_stats': v['batch_stats']},
          jnp.asarray(nhwc(x), dtype), train=True, mutable=['batch_stats'])
      y = jnp.asarray(labels)
      return (losses.segmentation_loss(logits, y)
              + 0.5 * losses.segmentation_loss(aux['aux_logits'], y))

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(v['params'])
    return float(loss), grads

  ref_loss32, ref32 = torch_step(torch.float32)
  ref_loss64, ref64 = torch_step(torch.float64)
  loss32, ours32 = flax_step(jnp.float32)
  with jax.enable_x64(True):
    loss64, ours64 = flax_step(jnp.float64)
  np.testing.assert_allclose(loss32, ref_loss32, rtol=1e-5)
  np.testing.assert_allclose(loss64, ref_loss64, rtol=1e-12)
  assert _global_rel(ours64, ref64) <= 1e-6
  for path, g in jax.tree_util.tree_leaves_with_path(ours64):
    assert rel(g, _leaf(ref64, path)) <= 1e-5, jax.tree_util.keystr(path)
  torch_error = _global_rel(ref32, ref64)
  print(f'training step: loss {loss32:.7f} vs {ref_loss32:.7f} (float32); '
        f'gradients float64 {_global_rel(ours64, ref64):.2e}, float32 vs '
        f'float64: ours {_global_rel(ours32, ref64):.2e}, torchvision '
        f'{torch_error:.2e}')
  assert _global_rel(ours32, ref64) <= 2 * torch_error + 1e-6, (
      _global_rel(ours32, ref64), torch_error)


def _leaf(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


def test_imagenet_resnet101_into_the_deeplabv3_recipe(tmp_path, capsys):
  """The README's path: torchvision's resnet101 state dict (random weights
  stand in for IMAGENET1K_V1) -> ``python -m flaxseg.convert backbone`` ->
  ``configs/deeplabv3.py`` with ``config.model.backbone_init`` -> a training
  step (on tiny synthetic images). The .pth given directly gives the same
  weights."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from flaxseg.convert.__main__ import main as convert_main  # pylint: disable=g-import-not-at-top
  from flaxseg.train import loop, warm_start  # pylint: disable=g-import-not-at-top
  net = randomize(torchvision.models.resnet101(weights=None), seed=7)
  pth = str(tmp_path / 'resnet101.pth')
  torch.save(net.state_dict(), pth)
  out = str(tmp_path / 'weights')
  assert convert_main(['backbone', '--arch', 'resnet101', '--input', pth,
                       '--output', out]) == 0

  root = os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  spec = importlib.util.spec_from_file_location(
      'recipe_deeplabv3', os.path.join(root, 'configs', 'deeplabv3.py'))
  recipe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipe)
  config = recipe.get_config()
  assert config.model.name == 'deeplabv3_resnet101'
  # The paper recipe's model; tiny synthetic data so one step fits here.
  config.data.dataset = 'synthetic'
  config.data.num_classes = 7
  config.data.train_split = 'train'
  config.data.synthetic.num_train = 4
  config.data.synthetic.num_val = 2
  config.data.synthetic.min_size = 24
  config.data.synthetic.max_size = 32
  config.data.crop_size = config.data.eval_pad_size = 33
  config.data.batch_size = config.data.eval_batch_size = 2
  config.train.num_steps = 1
  config.eval.num_visualize = 0
  config.checkpoint.async_save = False

  config.model.backbone_init = out
  fresh = loop.initial_state(config, loop.build_model(config))
  from_dir = warm_start.init_backbone(config, fresh)
  config.model.backbone_init = pth
  from_pth = warm_start.init_backbone(config, fresh)
  jax.tree.map(np.testing.assert_array_equal, from_dir.params, from_pth.params)
  with torch.no_grad():
    np.testing.assert_allclose(
        from_dir.params['backbone']['layer3_block22']['conv2']['kernel'],
        net.layer3[22].conv2.weight.numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      from_dir.batch_stats['backbone']['bn1']['var'], net.bn1.running_var)

  config.model.backbone_init = out
  result = loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert result['step'] == 1 and np.isfinite(result['train_loss'])
  assert 'backbone_init (resnet101)' in capsys.readouterr().out
