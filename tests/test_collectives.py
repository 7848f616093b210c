"""Device-ordered sums and the BatchNorm built on them; distributed start-up.

The multi-device checks run in a subprocess with 4 CPU devices (this process
has one); ``tests/train/test_multihost.py`` runs the whole trainer on two
processes.
"""

import json
import os
import subprocess
import sys

import ml_collections
import pytest

from flaxseg import collectives
from flaxseg.config import default_config
from flaxseg.train import distributed
from tests import xla_env

SCRIPT = r'''
import json
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
from flaxseg import collectives
from flaxseg.models import layers

assert jax.device_count() == 4
ax = collectives.OrderedAxis('b')
x = jax.random.normal(jax.random.key(0), (4, 2, 5, 5, 3)) * 3.0 + 1.0
out = {}

# ordered psum: the gathered values summed in device order, on every device.
s = jax.pmap(lambda v: collectives.psum(v, ax), axis_name='b')(x)
expect = jnp.sum(x, axis=0)
out['psum_exact'] = bool(all(np.array_equal(s[i], expect) for i in range(4)))
plain = jax.pmap(lambda v: jax.lax.psum(v, 'b'), axis_name='b')(x)
out['psum_vs_lax'] = float(jnp.max(jnp.abs(s - plain)))
g1 = jax.pmap(jax.grad(lambda v: jnp.sum(jnp.sin(collectives.pmean(v, ax)))),
              axis_name='b')(x)
g2 = jax.pmap(jax.grad(lambda v: jnp.sum(jnp.sin(jax.lax.pmean(v, 'b')))),
              axis_name='b')(x)
out['grad_vs_lax'] = float(jnp.max(jnp.abs(g1 - g2)))

# OrderedSyncBatchNorm against nn.BatchNorm (two-pass variance).
ref = nn.BatchNorm(momentum=0.9, epsilon=1e-5, axis_name='b',
                   use_fast_variance=False)
new = layers.make_norm(momentum=0.9, axis_name=ax)()
assert isinstance(new, layers.OrderedSyncBatchNorm)
v = ref.init(jax.random.key(1), x[0], use_running_average=False)
v2 = new.init(jax.random.key(1), x[0], use_running_average=False)
out['same_variables'] = (jax.tree.structure(v) == jax.tree.structure(v2) and
                         jax.tree.map(jnp.shape, v) == jax.tree.map(jnp.shape, v2))
v = jax.tree.map(lambda a: a + 0.1 * jnp.arange(a.size).reshape(a.shape), v)

def run(m, axis):
  def f(x):
    def loss(p, x):
      y, upd = m.apply({'params': p, 'batch_stats': v['batch_stats']}, x,
                       use_running_average=False, mutable=['batch_stats'])
      return jnp.sum(jnp.sin(y) * jnp.arange(y.size).reshape(y.shape)), (y, upd)
    (_, (y, upd)), (gp, gx) = jax.value_and_grad(loss, (0, 1), has_aux=True)(
        v['params'], x)
    return (y, upd, collectives.psum(gp, axis), gx,
            m.apply(v, x, use_running_average=True))
  return jax.pmap(f, axis_name='b')(x)

a, b = run(ref, 'b'), run(new, ax)
out['bn_max_diff'] = max(float(jnp.max(jnp.abs(p - q)))
                         for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
out['bn_max'] = max(float(jnp.max(jnp.abs(p))) for p in jax.tree.leaves(a))
print(json.dumps(out))
'''


def test_ordered_sums_and_batchnorm_on_4_devices():
  env = xla_env.cpu_devices(4)
  proc = subprocess.run([sys.executable, '-c', SCRIPT], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out['psum_exact']
  assert out['psum_vs_lax'] < 1e-5
  assert out['grad_vs_lax'] < 1e-6
  assert out['same_variables']
  assert out['bn_max_diff'] <= 1e-5 * max(1.0, out['bn_max']), out


def test_axis_name_for():
  assert collectives.axis_name_for('batch', 'psum') == 'batch'
  assert type(collectives.axis_name_for('batch', 'psum')) is str
  ordered = collectives.axis_name_for('batch', 'ordered')
  assert isinstance(ordered, collectives.OrderedAxis) and ordered == 'batch'
  assert hash(ordered) == hash('batch')
  assert collectives.axis_name_for(None, 'ordered') is None
  with pytest.raises(ValueError, match='config.train.reduction'):
    collectives.axis_name_for('batch', 'tree')


def _dist(**overrides) -> ml_collections.ConfigDict:
  d = default_config().distributed
  for k, v in overrides.items():
    d[k] = v
  return d


def test_distributed_single_process_defaults():
  # No coordinator and no cluster here: 'auto' stays single-process (and so
  # does a process in which JAX already runs, as in this test session).
  assert distributed.initialize(_dist())['initialized'] is False
  assert distributed.initialize(_dist(mode='off'))['initialized'] is False


@pytest.mark.parametrize('overrides,match', [
    (dict(mode='sometimes'), 'config.distributed.mode'),
    (dict(num_processes=-2), 'config.distributed.num_processes'),
    (dict(num_processes=2, process_id=2), 'config.distributed.process_id'),
    (dict(coordinator_address='127.0.0.1:1', local_device_ids='0;1'),
     'config.distributed.local_device_ids'),
])
def test_distributed_bad_values_name_the_key(overrides, match):
  with pytest.raises(ValueError, match=match):
    distributed.initialize(_dist(**overrides))


def test_distributed_after_jax_started_is_a_clear_error():
  # An explicit multi-process start in a process that already computed.
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  jnp.zeros(1).block_until_ready()
  with pytest.raises(RuntimeError, match='before any JAX computation'):
    distributed.initialize(_dist(coordinator_address='127.0.0.1:1',
                                 num_processes=2, process_id=1))
