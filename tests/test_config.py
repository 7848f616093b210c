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
