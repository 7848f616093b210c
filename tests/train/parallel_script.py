"""Run in a subprocess with 8 simulated CPU devices (see test_parallel.py).

Trains a tiny DeepLab v3 for a few steps three ways -- one device, pmap over
8, jit(shard_map) over 8 -- on the same global batches, and prints the final
parameters' maximum differences and the per-step losses as JSON.
"""

import json
import sys

import jax
import numpy as np

from flaxseg import models
from flaxseg.config import default_config
from flaxseg.train import optim, parallel, state as state_lib, step as step_lib

import functools


def run(mode, devices, batches):
  model = models.create_model(
      'deeplabv3_resnet18', num_classes=3, base_width=4, aspp_width=8,
      aspp_dropout=0.0, output_stride=8, bn_momentum=0.9,
      bn_axis_name=parallel.AXIS)
  cfg = default_config().optim
  cfg.lr = 0.05
  tx = optim.create_optimizer(cfg, 10)
  st = state_lib.create_train_state(model, tx, jax.random.key(0),
                                    (1, 17, 17, 3))
  dp = parallel.DataParallel(mode, devices)
  fn = dp.map(functools.partial(step_lib.train_step, seed=0),
              (parallel.REPLICATED, parallel.REPLICATED), donate_state=True)
  dst = dp.put_state(st)
  losses = []
  for b in batches:
    dst, m = fn(dst, dp.put_batch(b))
    losses.append(float(dp.fetch(m)['loss']))
  return dp.get_state(dst), losses


def main():
  rng = np.random.default_rng(0)
  batches = [{'image': rng.normal(size=(8, 17, 17, 3)).astype(np.float32),
              'label': rng.integers(0, 3, size=(8, 17, 17)).astype(np.int32)}
             for _ in range(3)]
  for b in batches:
    b['label'][:2, :5] = 255
  devs = jax.devices()
  assert len(devs) == 8, devs
  ref, ref_losses = run('pmap', devs[:1], batches)
  out = {'ref_losses': ref_losses}
  for mode in ('pmap', 'shard_map'):
    st, ls = run(mode, devs, batches)
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                         (st.params, st.batch_stats),
                         (ref.params, ref.batch_stats))
    out[mode] = {'losses': ls,
                 'max_param_diff': max(jax.tree.leaves(diffs)),
                 'max_param': max(float(np.max(np.abs(x)))
                                  for x in jax.tree.leaves(ref.params))}
  json.dump(out, sys.stdout)


if __name__ == '__main__':
  main()
