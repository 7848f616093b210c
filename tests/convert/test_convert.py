"""Weight import without torch: tables, errors, safetensors, the command.

State dicts here are numpy dicts in torchvision's layout, built from the
flaxseg model's shapes (the inverse of the conversion); the numerical parity
against real torchvision models is tests/convert/test_parity.py.
"""

import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from flaxseg import convert
from flaxseg.checkpoint import CheckpointError, load_variables
from flaxseg.convert import api, tables
from flaxseg.convert.__main__ import main as convert_main


def torch_layout(arch='resnet18', seed=0):
  """A random state dict with torchvision's names and shapes for ``arch``."""
  rng = np.random.default_rng(seed)
  target = api.reference_backbone(arch)
  flat = {c: traverse_util.flatten_dict(target[c], sep='/')
          for c in ('params', 'batch_stats')}
  table, _ = tables.backbone_table(arch)
  out = {}
  for entry in table:
    for key, (collection, leaf) in tables.tensor_names(entry).items():
      shape = flat[collection][f'{entry.flax}/{leaf}'].shape
      if leaf == 'kernel':
        kh, kw, cin, cout = shape
        shape = ((cout, cin * kh * kw) if entry.kind == 'linear_conv'
                 else (cout, cin, kh, kw))
      out[key] = rng.normal(size=shape).astype(np.float32)
      if leaf == 'var':
        out[key] = np.abs(out[key]) + 0.5
    if entry.kind == 'bn':
      out[f'{entry.torch}.num_batches_tracked'] = np.asarray(7, np.int64)
  if arch.startswith('resnet'):
    out['fc.weight'] = rng.normal(size=(1000, 512)).astype(np.float32)
    out['fc.bias'] = np.zeros(1000, np.float32)
  return out


def test_resnet_backbone_layout():
  sd = torch_layout('resnet18')
  variables = convert.import_backbone(sd, 'resnet18')
  p = variables['params']['backbone']
  np.testing.assert_array_equal(p['layer2_block0']['conv1']['kernel'],
                                sd['layer2.0.conv1.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(p['layer1_block1']['bn2']['scale'],
                                sd['layer1.1.bn2.weight'])
  np.testing.assert_array_equal(
      variables['batch_stats']['backbone']['layer3_block0']['downsample_bn']
      ['var'], sd['layer3.0.downsample.1.running_var'])
  assert 'downsample_conv' not in p['layer1_block0']     # BasicBlock, 64->64
  assert 'fc' not in p


def test_errors_name_every_bad_tensor():
  sd = torch_layout('resnet18')
  del sd['layer1.0.conv1.weight']
  sd['layer4.1.bn2.weight'] = sd['layer4.1.bn2.weight'][:10]
  sd['head.extra'] = np.zeros(3, np.float32)
  with pytest.raises(convert.ConversionError) as e:
    convert.import_backbone(sd, 'resnet18', source='r18.pth')
  text = str(e.value)
  assert 'r18.pth does not fit the model (3 problem(s))' in text
  assert 'missing: layer1.0.conv1.weight (for params/backbone/layer1_block0/conv1/kernel)' in text
  assert ('layer4.1.bn2.weight: shape (10,) does not fit '
          'params/backbone/layer4_block1/bn2/scale (512,)') in text
  assert 'unexpected: head.extra (3,)' in text
  # A ResNet-50 file given as ResNet-18: every block's conv3 is unexpected.
  with pytest.raises(convert.ConversionError, match='unexpected: layer1.0.conv3'):
    convert.import_backbone(torch_layout('resnet50'), 'resnet18')
  with pytest.raises(convert.ConversionError, match='unknown backbone'):
    convert.import_backbone(sd, 'resnet19')


def test_vgg_fc_layers_as_convolutions_and_decimated_for_deeplab():
  sd = torch_layout('vgg16')
  sd['classifier.6.weight'] = np.zeros((1000, 4096), np.float32)
  sd['classifier.6.bias'] = np.zeros(1000, np.float32)
  variables = convert.import_backbone(sd, 'vgg16')
  fc6 = variables['params']['backbone']['fc6']['kernel']
  assert fc6.shape == (7, 7, 512, 4096)
  # torch flattens (C, H, W): weight[o, c*49 + y*7 + x] is kernel[y, x, c, o].
  np.testing.assert_array_equal(fc6[2, 5, 3, 9],
                                sd['classifier.0.weight'][9, 3 * 49 + 2 * 7 + 5])
  # DeepLab-LargeFOV's fc6 (3x3, 1024): taps 0, 3, 6 and every 4th filter.
  target = {'params': {'backbone': {
      'fc6': {'kernel': jax.ShapeDtypeStruct((3, 3, 512, 1024), np.float32),
              'bias': jax.ShapeDtypeStruct((1024,), np.float32)},
      'fc7': {'kernel': jax.ShapeDtypeStruct((1, 1, 1024, 1024), np.float32),
              'bias': jax.ShapeDtypeStruct((1024,), np.float32)}}}}
  fitted = convert.fit_backbone(variables, target)['params']['backbone']
  np.testing.assert_array_equal(fitted['fc6']['kernel'],
                                fc6[::3, ::3, :, ::4])
  np.testing.assert_array_equal(fitted['fc6']['bias'],
                                sd['classifier.0.bias'][::4])
  np.testing.assert_array_equal(
      fitted['fc7']['kernel'][0, 0],
      sd['classifier.3.weight'].T[::4, ::4])
  # A backbone without fc6/fc7 (DeepLab v2 VGG) gets the convolutions only.
  bare = convert.fit_backbone(variables, {'params': {'backbone': {}}})
  assert 'fc6' not in bare['params']['backbone']
  assert 'conv5_3' in bare['params']['backbone']


def test_safetensors_file_and_truncated_file(tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  sd = torch_layout('resnet18')
  path = str(tmp_path / 'r18.safetensors')
  save_file(sd, path)
  back = convert.load_state_dict(path)
  assert set(back) == set(sd)
  np.testing.assert_array_equal(back['conv1.weight'], sd['conv1.weight'])
  with open(path, 'rb') as f:
    data = f.read()
  cut = str(tmp_path / 'cut.safetensors')
  with open(cut, 'wb') as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(convert.ConversionError, match='cut.safetensors'):
    convert.load_state_dict(cut)
  with pytest.raises(convert.ConversionError, match='does not exist'):
    convert.load_state_dict(str(tmp_path / 'nowhere.pth'))


def test_command_writes_a_checkpoint_and_never_overwrites(tmp_path, capsys):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  src = str(tmp_path / 'r18.safetensors')
  save_file(torch_layout('resnet18'), src)
  out = str(tmp_path / 'weights')
  assert convert_main(['backbone', '--arch', 'resnet18', '--input', src,
                       '--output', out]) == 0
  assert '--config.model.backbone_init=' in capsys.readouterr().out
  variables, meta = load_variables(out)
  assert meta['kind'] == 'backbone' and meta['arch'] == 'resnet18'
  assert meta['converted_from'] == os.path.abspath(src)
  assert 'layer4_block1' in variables['params']['backbone']
  before = os.listdir(os.path.join(out, 'checkpoints'))
  assert convert_main(['backbone', '--arch', 'resnet18', '--input', src,
                       '--output', out]) == 2
  assert 'already holds a checkpoint' in capsys.readouterr().err
  assert os.listdir(os.path.join(out, 'checkpoints')) == before
  # A bad file: exit 2, the file named, nothing written.
  assert convert_main(['backbone', '--arch', 'resnet34', '--input', src,
                       '--output', str(tmp_path / 'w34')]) == 2
  assert 'missing: layer1.2.conv1.weight' in capsys.readouterr().err
  assert not os.path.exists(tmp_path / 'w34')


def test_backbone_arch_of_registry_models():
  assert convert.backbone_arch('deeplabv3_resnet101') == 'resnet101'
  assert convert.backbone_arch('deeplabv3plus_resnet50') == 'resnet50'
  assert convert.backbone_arch('fcn_resnet101_tv') == 'resnet101'
  assert convert.backbone_arch('deeplabv1_largefov') == 'vgg16'
  assert convert.backbone_arch('crfasrnn') == 'vgg16'
  with pytest.raises(convert.ConversionError, match='unet'):
    convert.backbone_arch('unet')


def test_backbone_init_through_the_trainer(tmp_path, capsys):
  """configs/deeplabv3.py's tiny variant (a narrow ResNet-18) starts from a
  converted backbone file: every backbone array is the file's, the head keeps
  its initialisation; a mismatched file names the arrays."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  from flaxseg.train import loop, warm_start  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      'recipe_deeplabv3', os.path.join(os.path.dirname(__file__), '..', '..',
                                       'configs', 'deeplabv3.py'))
  recipe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipe)
  config = recipe.get_config('tiny')
  model = loop.build_model(config, axis_name=None)
  fresh = loop.initial_state(config, model)
  # A file with the tiny model's (narrow) backbone shapes.
  bb = {'params': {'backbone': fresh.params['backbone']},
        'batch_stats': {'backbone': fresh.batch_stats['backbone']}}
  bb = jax.tree.map(lambda x: np.asarray(x) + 1.0, bb)
  from flaxseg.convert.__main__ import save_converted  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / 'bb')
  save_converted(path, bb, {'kind': 'backbone', 'arch': 'resnet18',
                            'model': {'name': 'resnet18 backbone'}})
  config.model.backbone_init = path
  state = warm_start.warm_start(config, fresh)
  jax.tree.map(np.testing.assert_array_equal,
               dict(state.params)['backbone'], bb['params']['backbone'])
  jax.tree.map(np.testing.assert_array_equal,
               dict(state.params)['classifier'],
               dict(fresh.params)['classifier'])
  assert 'backbone_init (resnet18)' in capsys.readouterr().out
  config.model.name = 'deeplabv3_resnet50'
  with pytest.raises(CheckpointError, match='needs a resnet50 backbone'):
    warm_start.warm_start(config, fresh)
