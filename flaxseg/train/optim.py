"""Optimizers and learning-rate schedules built from ``config.optim``.

Everything is optax. The recipes of the DeepLab papers use SGD with momentum
0.9, the "poly" policy ``lr * (1 - step / max_steps) ** 0.9`` (DeepLab v2
sec. 4.1, v3 sec. 4.1) and an L2 weight decay that, as in the TF DeepLab code
and torchvision's references with ``--norm-weight-decay 0``, is not applied to
BatchNorm parameters or biases.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import optax
from flax import traverse_util


def learning_rate_schedule(optim: Mapping[str, Any], total_steps: int):
  """Learning-rate schedule from ``config.optim``.

  Args:
    optim: with ``lr``, ``schedule`` ('poly', 'cosine', 'constant'),
      ``poly_power``, ``warmup_steps``, ``end_lr``.
    total_steps: length of training.

  Returns:
    An ``optax.Schedule``.
  """
  lr, warmup = float(optim['lr']), int(optim.get('warmup_steps', 0))
  end_lr = float(optim.get('end_lr', 0.0))
  decay_steps = max(total_steps - warmup, 1)
  kind = optim.get('schedule', 'poly')
  if kind == 'poly':
    main = optax.polynomial_schedule(lr, end_lr, float(optim['poly_power']),
                                     decay_steps)
  elif kind == 'cosine':
    main = optax.cosine_decay_schedule(lr, decay_steps, end_lr / lr if lr else 0)
  elif kind == 'constant':
    main = optax.constant_schedule(lr)
  else:
    raise ValueError(f"config.optim.schedule: unknown schedule {kind!r} "
                     "(expected 'poly', 'cosine' or 'constant')")
  if warmup <= 0:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def decay_mask(params) -> Any:
  """True for the parameters weight decay applies to: conv/dense kernels."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {path: path[-1] == 'kernel' for path in flat})


def _lr_multiplier_labels(params, multipliers: Mapping[str, float]):
  """Labels each parameter with the first regex in ``multipliers`` it matches."""
  patterns = [(re.compile(p), p) for p in multipliers]
  def label(path):
    name = '/'.join(path)
    for regex, key in patterns:
      if regex.search(name):
        return key
    return 'default'
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: label(k) for k in flat})


def create_optimizer(optim: Mapping[str, Any], total_steps: int
                     ) -> optax.GradientTransformation:
  """The optax optimizer described by ``config.optim``.

  Args:
    optim: ``name`` ('sgd' or 'adamw'), ``lr`` and schedule keys,
      ``momentum``, ``nesterov``, ``weight_decay``, ``grad_clip_norm``
      (0 = off), ``lr_multipliers`` (regex over 'a/b/kernel' paths ->
      factor; DeepLab v1/v2 train the classifier at 10x).
    total_steps: length of training, for the schedule.

  Returns:
    A GradientTransformation.
  """
  schedule = learning_rate_schedule(optim, total_steps)
  name = optim.get('name', 'sgd')
  weight_decay = float(optim.get('weight_decay', 0.0))
  parts = []
  if float(optim.get('grad_clip_norm', 0.0)) > 0:
    parts.append(optax.clip_by_global_norm(float(optim['grad_clip_norm'])))
  if name == 'sgd':
    if weight_decay:
      # L2 added to the gradient before momentum, like torch.optim.SGD.
      parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
    parts.append(optax.sgd(schedule, momentum=float(optim['momentum']) or None,
                           nesterov=bool(optim.get('nesterov', False))))
  elif name == 'adamw':
    parts.append(optax.adamw(schedule, weight_decay=weight_decay,
                             mask=decay_mask))
  else:
    raise ValueError(f"config.optim.name: unknown optimizer {name!r} "
                     "(expected 'sgd' or 'adamw')")
  tx = optax.chain(*parts)
  multipliers = dict(optim.get('lr_multipliers', None) or {})
  if multipliers:
    transforms = {k: optax.chain(tx, optax.scale(float(v)))
                  for k, v in multipliers.items()}
    transforms['default'] = tx
    tx = optax.multi_transform(
        transforms, lambda p: _lr_multiplier_labels(p, multipliers))
  return tx
