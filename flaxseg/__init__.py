"""flaxseg: classic semantic segmentation in JAX/Flax.

The public surface for functional research; everything is plain Flax/optax:

  model = flaxseg.create_model('deeplabv3_resnet101', num_classes=21)
  variables = model.init(key, images)          # {'params', 'batch_stats'}
  logits, aux = model.apply(variables, images)  # logits at input resolution

plus the loss, the metrics and the pure train/eval steps. The trainer
(``flaxseg.train.loop``) and the data pipeline (``flaxseg.data``) are imported
on demand, so ``import flaxseg`` does not load TensorFlow.
"""

from flaxseg.losses import segmentation_loss, pixel_cross_entropy
from flaxseg.metrics import (confusion_matrix, segmentation_scores,
                             format_iou_table)
from flaxseg.models import create_model, list_models
from flaxseg.train.state import TrainState, create_train_state
from flaxseg.train.step import train_step, eval_step, predict_logits

__version__ = '0.1.0'

__all__ = [
    'create_model', 'list_models', 'segmentation_loss', 'pixel_cross_entropy',
    'confusion_matrix', 'segmentation_scores', 'format_iou_table',
    'TrainState', 'create_train_state', 'train_step', 'eval_step',
    'predict_logits',
]
