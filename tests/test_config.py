"""Every recipe in configs/ loads and validates; unknown keys are named."""

import glob
import importlib.util
import os

import pytest

from flaxseg.config import default_config, validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every recipe file (not the package's __init__ or the shared common.py).
RECIPES = sorted(p for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
                 if os.path.basename(p) not in ('__init__.py', 'common.py'))


def load_recipe(path):
  spec = importlib.util.spec_from_file_location(
      os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def recipe_variants(module):
  """Variant names a recipe documents after 'Variants' in its docstring."""
  doc = module.__doc__ or ''
  names = [None]
  if 'Variants' in doc:
    for line in doc.split('Variants', 1)[1].splitlines()[1:]:
      word = line.strip().split(' ')[0]
      if line.startswith('  ') and not line.startswith('      ') and word:
        names.append(word)
  return names


@pytest.mark.parametrize('path', RECIPES, ids=os.path.basename)
def test_recipe_variants_validate(path):
  module = load_recipe(path)
  for variant in recipe_variants(module):
    validate_config(module.get_config(variant))


def test_unknown_key_is_named():
  c = default_config()
  c.optim.unlocked()
  with c.unlocked():
    c.optim.lrr = 0.1
    c.data.crop = 5
  with pytest.raises(ValueError) as e:
    validate_config(c)
  assert 'config.optim.lrr' in str(e.value)
  assert 'config.data.crop' in str(e.value)


def test_unknown_variant_is_named():
  module = load_recipe(os.path.join(ROOT, 'configs', 'deeplabv3.py'))
  with pytest.raises(ValueError, match='nope'):
    module.get_config('nope')


def _crf_values(config):
  crf = config.eval.crf
  return (crf.enabled, crf.num_iterations, crf.bi_w, crf.bi_xy_std,
          crf.bi_rgb_std, crf.pos_w, crf.pos_xy_std, crf.backend)


def test_crf_defaults_are_the_papers():
  # Off by default; DeepLab v1 LargeFOV's values (ICLR 2015, sec. 4.1).
  assert _crf_values(default_config()) == (
      False, 10, 4.0, 121.0, 5.0, 3.0, 3.0, 'permutohedral')
  v1 = load_recipe(os.path.join(ROOT, 'configs', 'deeplabv1.py'))
  assert _crf_values(v1.get_config()) == (
      True, 10, 4.0, 121.0, 5.0, 3.0, 3.0, 'permutohedral')
  assert not v1.get_config('tiny').eval.crf.enabled
  # DeepLab v2 ResNet-101 (TPAMI 2017, sec. 4.1).
  v2 = load_recipe(os.path.join(ROOT, 'configs', 'deeplabv2.py'))
  assert _crf_values(v2.get_config()) == (
      True, 10, 4.0, 67.0, 3.0, 3.0, 1.0, 'permutohedral')
  assert not v2.get_config('tiny').eval.crf.enabled


@pytest.mark.parametrize('key,value', [
    ('bi_xy_std', 0.0), ('bi_rgb_std', -1.0), ('pos_xy_std', float('nan')),
    ('bi_w', -0.5), ('pos_w', 'three'), ('num_iterations', -1),
    ('num_iterations', 2.5), ('backend', 'lattice'), ('enabled', 'yes')])
def test_bad_crf_value_is_named(key, value):
  c = default_config()
  with c.unlocked():
    c.eval.crf[key] = None   # drop the field's type check
    c.eval.crf[key] = value
  with pytest.raises(ValueError, match=f'config.eval.crf.{key}='):
    validate_config(c)


def test_unknown_crf_key_is_named():
  c = default_config()
  with c.unlocked():
    c.eval.crf.bi_ww = 4.0
  with pytest.raises(ValueError, match='config.eval.crf.bi_ww'):
    validate_config(c)
