"""DeepLab v3 on PASCAL VOC 2012 (Chen et al., arXiv:1706.05587).

Paper recipe (sec. 4 and 4.1): ResNet-101 with multi-grid (1, 2, 4) on block4,
output stride 16 in training, ASPP rates (6, 12, 18) with image-level
pooling, crop 513x513, batch 16, SGD momentum 0.9, initial LR 0.007 with the
poly policy (power 0.9), 30k iterations, weight decay 1e-4, BatchNorm decay
0.9997, trained on the augmented set (train_aug, 10,582 images), evaluated on
VOC 2012 val.

  python train.py --config=configs/deeplabv3.py --workdir=runs/deeplabv3 \
      --config.data.root=/data/VOCdevkit/VOC2012 \
      --config.data.sbd_root=/data/benchmark_RELEASE/dataset

Variants (``configs/deeplabv3.py:NAME``):
  paper_eval  the paper's best inference (sec. 4.1, "Inference strategy on
        val set": 77.21 -> 79.77 mIoU): the OS-16-trained model evaluated at
        output stride 8, scales 0.5-1.75 and left/right flips, probabilities
        averaged (TF DeepLab). Use it with ``--mode=eval`` or predict:
        ``python train.py --config=configs/deeplabv3.py:paper_eval
        --workdir=runs/deeplabv3 --mode=eval``.
  demo  DeepLab v3 (atrous ResNet, ASPP with image pooling, bilinear
        upsampling) with a narrow ResNet-18 on the bundled synthetic
        VOC-format set, sized for a 2-core CPU (``make demo``, about 7 min
        of training, val mIoU about 0.8).
  tiny  a few steps on tiny images, for tests.
"""

from configs import common
from flaxseg.config import default_config


def get_config(arg=None):
  """Returns the config for variant ``arg`` (None: the paper recipe)."""
  c = default_config()
  c.model.name = 'deeplabv3_resnet101'
  c.model.output_stride = 16
  c.model.multi_grid = (1, 2, 4)
  c.model.bn_momentum = 0.9997
  common.deeplabv3_training(c)
  if arg in (None, '', 'paper'):
    return c
  if arg == 'paper_eval':
    c.eval.output_stride = 8
    c.eval.scales = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    c.eval.flip = True
    c.eval.merge = 'probs'
    return c
  if arg in ('demo', 'tiny'):
    # Still DeepLab v3 (atrous ResNet, multi-grid, ASPP with image pooling,
    # align_corners bilinear upsampling), shrunk for a 2-core CPU: a narrow
    # ResNet-18 at output stride 8, trained from scratch. Adam with a cosine
    # schedule replaces the paper's SGD because there is no ImageNet
    # initialisation here and only a few minutes of CPU; see BENCHMARKS.md for
    # the runs behind these numbers.
    common.demo_synthetic(c)
    c.model.name = 'deeplabv3_resnet18'
    c.model.base_width = 16
    c.model.aspp_width = 64
    c.model.output_stride = 8
    c.model.bn_momentum = 0.9
    c.model.aspp_dropout = 0.0
    common.adam_from_scratch(c)
    c.optim.warmup_steps = 100
    c.train.num_steps = 3000
    c.train.log_every_steps = 100
    c.eval.every_steps = 1000
    c.checkpoint.every_steps = 1000
  if arg == 'tiny':
    common.tiny_synthetic(c)
    c.model.base_width = 8
    c.model.aspp_width = 16
    return c
  if arg != 'demo':
    raise ValueError(f'configs/deeplabv3.py: unknown variant {arg!r} '
                     "(expected 'paper_eval', 'demo' or 'tiny')")
  return c
