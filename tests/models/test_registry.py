"""Every registered model honours the model contract at an odd input size."""

import jax
import jax.numpy as jnp
import pytest

from flaxseg import models


@pytest.mark.parametrize('name', models.list_models())
def test_logits_at_input_resolution_for_odd_sizes(name):
  model = models.create_model(name, num_classes=21)
  x = jnp.zeros((1, 257, 321, 3), jnp.float32)

  def forward():
    variables = model.init({'params': jax.random.key(0),
                            'dropout': jax.random.key(1)}, x)
    return model.apply(variables, x, train=False)
  logits, aux = jax.eval_shape(forward)
  assert logits.shape == (1, 257, 321, 21)
  assert logits.dtype == jnp.float32
  assert isinstance(aux, dict)
  if 'aux_logits' in aux:
    assert aux['aux_logits'].shape == logits.shape


def test_unknown_model_and_argument_are_named():
  with pytest.raises(ValueError, match='no_such_model'):
    models.create_model('no_such_model', num_classes=3)
  with pytest.raises(ValueError, match='bogus'):
    models.create_model(models.list_models()[0], num_classes=3, bogus=1)
