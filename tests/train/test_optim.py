"""Tests for flaxseg.train.optim."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxseg.config import default_config
from flaxseg.train import optim


def test_poly_schedule_matches_formula():
  o = default_config().optim
  sched = optim.learning_rate_schedule(o, 100)
  for step in (0, 10, 50, 99):
    np.testing.assert_allclose(sched(step), 0.007 * (1 - step / 100) ** 0.9,
                               rtol=1e-5)


def test_weight_decay_skips_bn_and_bias():
  params = {'conv': {'kernel': jnp.ones((3, 3, 1, 1))},
            'bn': {'scale': jnp.ones(1), 'bias': jnp.ones(1)},
            'cls': {'kernel': jnp.ones((1, 2)), 'bias': jnp.ones(2)}}
  o = default_config().optim
  o.lr, o.momentum, o.weight_decay, o.schedule = 1.0, 0.0, 0.5, 'constant'
  tx = optim.create_optimizer(o, 10)
  zeros = {k: {n: jnp.zeros_like(v) for n, v in d.items()}
           for k, d in params.items()}
  updates, _ = tx.update(zeros, tx.init(params), params)
  assert float(updates['conv']['kernel'].sum()) == pytest.approx(-0.5 * 9)
  assert float(updates['bn']['scale'][0]) == 0.0
  assert float(updates['cls']['bias'].sum()) == 0.0


def test_lr_multiplier_scales_matching_params():
  params = {'backbone': {'kernel': jnp.ones(2)},
            'classifier': {'kernel': jnp.ones(2)}}
  o = default_config().optim
  o.lr, o.momentum, o.weight_decay, o.schedule = 1.0, 0.0, 0.0, 'constant'
  o.lr_multipliers = {'^classifier/': 10.0}
  tx = optim.create_optimizer(o, 10)
  grads = {'backbone': {'kernel': jnp.ones(2)},
           'classifier': {'kernel': jnp.ones(2)}}
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates['backbone']['kernel'], -1.0)
  np.testing.assert_allclose(updates['classifier']['kernel'], -10.0)


def test_unknown_optimizer_is_named():
  o = default_config().optim
  o.name = 'lion'
  with pytest.raises(ValueError, match='config.optim.name'):
    optim.create_optimizer(o, 10)
