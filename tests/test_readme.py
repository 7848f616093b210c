"""The README stays true: its example runs and its model table matches."""

import os
import re

import jax
import jax.numpy as jnp
import pytest

from flaxseg import models

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), 'README.md')


def _readme():
  with open(README) as f:
    return f.read()


def test_library_example_runs():
  blocks = re.findall(r'```python\n(.*?)```', _readme(), re.S)
  assert blocks, 'README has no python example'
  for block in blocks:
    exec(compile(block, 'README.md', 'exec'), {})  # pylint: disable=exec-used


def _param_count(name, **kwargs):
  model = models.create_model(name, num_classes=21, **kwargs)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 65, 65, 3))))
  return sum(x.size for x in jax.tree.leaves(shapes['params']))


def test_model_table_lists_every_model_with_its_count():
  rows = re.findall(r'^\| `([a-z0-9_]+)` \|[^|]*\| ([0-9,]+) \|', _readme(),
                    re.M)
  table = {name: int(count.replace(',', '')) for name, count in rows}
  assert sorted(table) == models.list_models()
  for name, count in table.items():
    assert _param_count(name) == count, name
