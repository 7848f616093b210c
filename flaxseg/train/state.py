"""The training state: parameters, BatchNorm statistics, optimizer state, step."""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
  """Everything a train step reads and writes.

  ``apply_fn`` and ``tx`` are static (not part of the pytree), so the state can
  be passed through ``jit``/``pmap``/``shard_map`` and saved with Orbax as
  plain arrays.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  apply_fn: Callable = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @property
  def variables(self):
    """Variables for ``apply_fn``."""
    return {'params': self.params, 'batch_stats': self.batch_stats}

  def apply_gradients(self, grads, batch_stats):
    """One optimizer update; returns the new state."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=params,
                        batch_stats=batch_stats, opt_state=opt_state)

  def checkpoint_tree(self):
    """The arrays that a checkpoint holds."""
    return {'step': self.step, 'params': self.params,
            'batch_stats': self.batch_stats, 'opt_state': self.opt_state}

  def replace_from_checkpoint(self, tree):
    """This state with the arrays of a restored ``checkpoint_tree``."""
    return self.replace(step=tree['step'], params=tree['params'],
                        batch_stats=tree['batch_stats'],
                        opt_state=tree['opt_state'])


#: XLA options for compiling ``model.init``: it runs once, so it is compiled
#: without backend optimisation (a quarter to a half of the compile time;
#: initial values can differ from an optimised build by an ulp).
INIT_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}


def init_model(model, rng, input_shape):
  """``model.init`` on zeros of ``input_shape`` (jitted, quick to compile)."""
  def init(rng):
    return model.init({'params': rng, 'dropout': rng},
                      jnp.zeros(input_shape, jnp.float32), train=False)
  lowered = jax.jit(init).lower(rng)
  try:
    compiled = lowered.compile(compiler_options=INIT_COMPILER_OPTIONS)
  except Exception:  # pylint: disable=broad-except
    compiled = lowered.compile()   # a backend without the option
  return compiled(rng)


def create_train_state(model, tx, rng, input_shape, *,
                       init_variables=None) -> TrainState:
  """Initialises a model and its optimizer.

  Args:
    model: a flaxseg model.
    tx: the optax optimizer.
    rng: PRNG key for initialisation.
    input_shape: ``(1, H, W, 3)`` shape of a dummy input.
    init_variables: optional variables to start from (e.g. converted weights).

  Returns:
    A ``TrainState`` at step 0.
  """
  variables = (init_variables if init_variables is not None
               else init_model(model, rng, input_shape))
  params = variables['params']
  batch_stats = variables.get('batch_stats', {})
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=batch_stats, opt_state=tx.init(params),
                    apply_fn=model.apply, tx=tx)
