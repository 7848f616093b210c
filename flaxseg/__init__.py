"""flaxseg: classic semantic segmentation in JAX/Flax.

The public surface for functional research; everything is plain Flax/optax:

  model = flaxseg.create_model('deeplabv3_resnet101', num_classes=21)
  variables = model.init(key, images)          # {'params', 'batch_stats'}
  logits, aux = model.apply(variables, images)  # logits at input resolution

plus the loss, the metrics and the pure train/eval steps. The trainer
(``flaxseg.train.loop``) and the data pipeline (``flaxseg.data``) are imported
on demand, so ``import flaxseg`` does not load TensorFlow.
"""

import importlib as _importlib

__version__ = '0.1.0'

#: Public name -> the module that defines it. Imported on first use (PEP
#: 562), so ``from flaxseg import cpu_malloc`` in a command's entry point
#: does not load JAX before that command re-executes itself.
_EXPORTS = {
    'create_model': 'flaxseg.models',
    'list_models': 'flaxseg.models',
    'segmentation_loss': 'flaxseg.losses',
    'pixel_cross_entropy': 'flaxseg.losses',
    'confusion_matrix': 'flaxseg.metrics',
    'segmentation_scores': 'flaxseg.metrics',
    'format_iou_table': 'flaxseg.metrics',
    'TrainState': 'flaxseg.train.state',
    'create_train_state': 'flaxseg.train.state',
    'train_step': 'flaxseg.train.step',
    'eval_step': 'flaxseg.train.step',
    'predict_logits': 'flaxseg.train.step',
}

__all__ = list(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    value = getattr(_importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
  if not name.startswith('_'):
    # ``flaxseg.models...`` after a bare ``import flaxseg``, as when the
    # package imported its modules eagerly.
    try:
      return _importlib.import_module(f'{__name__}.{name}')
    except ModuleNotFoundError as e:
      if e.name != f'{__name__}.{name}':
        raise
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))
