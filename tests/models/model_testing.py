"""Helpers shared by the model tests (not a test module).

Full-size models are only traced (`jax.eval_shape`); real forward passes use
tiny widths with variables filled from NumPy, because random initialisation
under jit costs more than the forward pass itself on CPU.
"""

import jax
import jax.numpy as jnp
import numpy as np

KEY = jax.random.key(0)


def num_params(model, shape=(1, 64, 64, 3)):
  """Parameter count of `model` (batch statistics excluded), traced only."""
  variables = jax.eval_shape(model.init, KEY, jnp.zeros(shape))
  return sum(x.size for x in jax.tree.leaves(variables['params']))


def fake_variables(model, shape, seed=0):
  """Variables of `model` with He-scaled NumPy kernels and identity BN."""
  abstract = jax.eval_shape(model.init, KEY, jnp.zeros(shape))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      std = np.sqrt(2. / np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.normal(0., std, leaf.shape), leaf.dtype)
    if name in ('scale', 'var'):
      return jnp.ones(leaf.shape, leaf.dtype)
    return jnp.asarray(rng.normal(0., 0.1, leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)
