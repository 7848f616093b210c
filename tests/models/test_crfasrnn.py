"""Tests for the CRF-RNN model (flaxseg/models/crfasrnn.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseg import models
from flaxseg.crf import rnn
from flaxseg.models import crfasrnn, fcn

from model_testing import fake_variables, num_params

KEY = jax.random.key(0)


def test_parameters_are_fcn8s_plus_three_label_matrices():
  """FCN-8s (134,489,759 with 21 classes) + spatial, bilateral and
  compatibility matrices (3 * 21 * 21 = 1,323): 134,491,082."""
  model = models.create_model('crfasrnn', num_classes=21)
  assert num_params(model) == 134_489_759 + 3 * 21 * 21 == 134_491_082
  ours = jax.eval_shape(model.init, KEY, jnp.zeros((1, 64, 64, 3)))['params']
  base = jax.eval_shape(fcn.fcn8s(num_classes=21).init, KEY,
                        jnp.zeros((1, 64, 64, 3)))['params']
  # An FCN-8s checkpoint loads unchanged: same names and shapes at the top.
  crf = ours.pop('crf')
  assert jax.tree.map(lambda x: x.shape, ours) == jax.tree.map(
      lambda x: x.shape, base)
  assert sorted(crf) == ['bilateral_weights', 'compatibility',
                         'spatial_weights']
  learned = models.create_model('crfasrnn', num_classes=21,
                                learn_bandwidths=True)
  assert num_params(learned) == 134_491_082 + 3


def test_forward_refines_fcn_scores_with_the_image():
  model = crfasrnn.crfasrnn(num_classes=4, width_multiplier=1 / 32,
                            padding='same', theta_alpha=10.0,
                            eval_iterations=3)
  shape = (2, 37, 45, 3)
  variables = fake_variables(model, shape)
  # The CRF's initial parameters do not depend on the image size or backend.
  variables['params']['crf'] = rnn.CRFasRNN(num_classes=4, backend='exact').init(
      KEY, jnp.zeros((1, 4, 4, 4)), jnp.zeros((1, 4, 4, 3)))['params']
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  logits, aux = jax.jit(model.apply, static_argnums=2)(variables, x, False)
  assert logits.shape == aux['unary_logits'].shape == (2, 37, 45, 4)
  # The unary is exactly FCN-8s's output with the same parameters.
  base = fcn.fcn8s(num_classes=4, width_multiplier=1 / 32, padding='same')
  fcn_vars = {'params': {k: v for k, v in variables['params'].items()
                         if k != 'crf'}}
  ref, _ = jax.jit(base.apply)(fcn_vars, x)
  np.testing.assert_allclose(aux['unary_logits'], ref, rtol=1e-5, atol=1e-5)
  # ... and the CRF layer on it, with the image in 0..255.
  image = (x * jnp.asarray(model.pixel_std) + jnp.asarray(model.pixel_mean)
           ) * 255.0
  crf = rnn.CRFasRNN(num_classes=4, theta_alpha=10.0, eval_iterations=3)
  want = jax.jit(crf.apply)({'params': variables['params']['crf']}, ref,
                            image)
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
  assert float(jnp.max(jnp.abs(logits - ref))) > 1e-3


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match='num_iterations'):
    crfasrnn.crfasrnn(num_classes=3, num_iterations=0)
  with pytest.raises(ValueError, match='theta_beta'):
    crfasrnn.crfasrnn(num_classes=3, theta_beta=-1.0)
  with pytest.raises(ValueError, match='crf_backend|backend'):
    crfasrnn.crfasrnn(num_classes=3, crf_backend='lattice')
  with pytest.raises(ValueError, match='padding'):
    crfasrnn.crfasrnn(num_classes=3, padding='valid')
  with pytest.raises(ValueError, match='pixel_std'):
    crfasrnn.crfasrnn(num_classes=3, pixel_std=(0.2, 0.2))
