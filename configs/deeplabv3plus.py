"""DeepLab v3+ on PASCAL VOC 2012 (Chen et al., ECCV 2018, arXiv:1802.02611).

Paper recipe (sec. 4, "the same training protocol as in DeepLab v3"): the
DeepLab v3 encoder (ResNet-101, multi-grid (1, 2, 4) on block4, ASPP rates
(6, 12, 18) with image-level pooling) at output stride 16 in training, plus
the decoder (48-channel 1x1 projection of the stride-4 features, two 3x3
convolutions of 256 channels, sec. 3.1 and tables 1-2); crop 513x513, batch
16, SGD momentum 0.9, initial LR 0.007 with the poly policy (power 0.9), 30k
iterations, weight decay 1e-4 (4e-5 for the Xception backbone; we use
ResNet), BatchNorm decay 0.9997, trained on the augmented set (train_aug,
10,582 images), evaluated on VOC 2012 val. Not reproduced here: the paper's
best numbers evaluate at output stride 8 with multi-scale and flipped inputs
(this trainer evaluates single-scale at the training output stride) and start
from ImageNet (and COCO / JFT) pretrained weights, which this recipe does not
load.

  python train.py --config=configs/deeplabv3plus.py \
      --workdir=runs/deeplabv3plus \
      --config.data.root=/data/VOCdevkit/VOC2012 \
      --config.data.sbd_root=/data/benchmark_RELEASE/dataset

Variants (``configs/deeplabv3plus.py:NAME``):
  tiny  a few steps on tiny images, for tests.
"""

from configs import common
from flaxseg.config import default_config


def get_config(arg=None):
  """Returns the config for variant ``arg`` (None: the paper recipe)."""
  c = default_config()
  c.model.name = 'deeplabv3plus_resnet101'
  c.model.output_stride = 16
  c.model.multi_grid = (1, 2, 4)
  c.model.low_level_width = 48
  c.model.decoder_width = 256
  c.model.bn_momentum = 0.9997
  common.deeplabv3_training(c)
  if arg in (None, '', 'paper'):
    return c
  if arg != 'tiny':
    raise ValueError(f'configs/deeplabv3plus.py: unknown variant {arg!r} '
                     "(expected 'tiny')")
  # Still DeepLab v3+ (atrous ResNet, ASPP, layer1 decoder), shrunk to a
  # narrow ResNet-18 trained from scratch for a few steps on tiny synthetic
  # images; Adam with a cosine schedule as the DeepLab v3 demo/tiny variants.
  common.tiny_synthetic(c)
  common.adam_from_scratch(c)
  c.model.name = 'deeplabv3plus_resnet18'
  c.model.base_width = 8
  c.model.aspp_width = 16
  c.model.low_level_width = 8
  c.model.decoder_width = 16
  c.model.output_stride = 8
  c.model.bn_momentum = 0.9
  c.model.aspp_dropout = 0.0
  return c
