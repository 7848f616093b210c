"""FCN-8s on PASCAL VOC (Long, Shelhamer & Darrell, CVPR 2015 / PAMI 2016).

FCN-16s plus the pool3 skip (sec. 4.2): two learned 2x transposed
convolutions (bilinear-initialised) fuse score_fr with zero-initialised 1x1
scores of pool4 and pool3 (crops 5 and 9 in the paper's pad-100 layout), then a
fixed bilinear 8x upsampling (crop 31). 134,489,759 parameters with 21
classes. The staged recipe initialises it from FCN-16s and lowers the learning
rate 100x again: fixed 1e-14 on the unnormalised loss (the released voc-fcn8s
solver), SGD momentum 0.99, batch 1 whole images, weight decay 5e-4, biases at
2x LR, 100k iterations, no augmentation. Initialising from an FCN-16s
checkpoint is a weight-import step (not done by this config). CVPR 2015
reports 62.7 mean IU on VOC 2011 test; the paper trains on SBD train and
reports seg11valid, train_aug / val are this library's nearest splits.

  python train.py --config=configs/fcn8s.py --workdir=runs/fcn8s \
      --config.data.root=/data/VOCdevkit/VOC2012 \
      --config.data.sbd_root=/data/benchmark_RELEASE/dataset

Variants (``configs/fcn8s.py:NAME``):
  tiny  a few steps of a narrow FCN-8s on tiny synthetic images, for tests.
"""

from configs import common


def get_config(arg=None):
  """Returns the config for variant ``arg`` (None: the paper recipe)."""
  return common.fcn_recipe('fcn8s', 1e-14, 'upscore8', arg)
