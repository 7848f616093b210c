"""Every recipe's tiny variant trains: the loss goes down on generated data.

The recipes are built exactly as the trainer builds them (model from the
registry, optimizer from ``config.optim``, the pure train step), then take a
few steps on one fixed batch from the synthetic VOC-format set, which a
working model and optimizer must fit.
"""

import glob
import importlib.util
import os

import jax
import numpy as np
import pytest

from flaxseg.data import pipeline, voc
from flaxseg.train import loop, step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every recipe file (not the package's __init__ or the shared common.py).
RECIPES = sorted(p for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
                 if os.path.basename(p) not in ('__init__.py', 'common.py'))
STEPS = 6


def _tiny(path):
  spec = importlib.util.spec_from_file_location(
      'recipe_' + os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config('tiny')


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
  """The synthetic tree the tiny variants describe (they all share it)."""
  c = _tiny(os.path.join(ROOT, 'configs', 'deeplabv3.py'))
  return loop.ensure_synthetic(str(tmp_path_factory.mktemp('recipes') / 'v'),
                               c.data.synthetic.to_dict(), c.seed)


@pytest.mark.parametrize('path', RECIPES, ids=os.path.basename)
def test_tiny_variant_loss_goes_down(path, tiny_data):
  config = _tiny(path)
  assert config.data.dataset == 'synthetic'
  records = voc.list_records(tiny_data, config.data.train_split)
  batch = next(pipeline.train_dataset(
      records, num_classes=config.data.num_classes,
      global_batch_size=config.data.batch_size,
      crop_size=(config.data.crop_size,) * 2, seed=0,
      scale_range=tuple(config.data.scale_range)).as_numpy_iterator())
  state = loop.initial_state(config, loop.build_model(config, axis_name=None))
  train = jax.jit(lambda s, b: step_lib.train_step(
      s, b, axis_name=None, seed=config.seed,
      aux_loss_weight=config.train.aux_loss_weight,
      scale_loss_weight=config.train.scale_loss_weight,
      normalize_loss=config.train.normalize_loss))
  losses = []
  for _ in range(STEPS):
    state, metrics = train(state, batch)
    losses.append(float(metrics['loss']))
  assert np.all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0], losses
