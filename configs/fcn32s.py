"""FCN-32s on PASCAL VOC (Long, Shelhamer & Darrell, CVPR 2015 / PAMI 2016).

VGG-16 with fc6/fc7 as convolutions, a zero-initialised 1x1 score layer and a
single 32x upsampling fixed to bilinear interpolation (sec. 3, 4.1). PAMI
"heavy learning" recipe (sec. 4.3, 5; the released voc-fcn32s solver): SGD,
momentum 0.99, batch 1 (whole images: crop 500 = VOC's largest side, padding
ignored), a fixed learning rate of 1e-10 on the unnormalised loss (summed over
pixels), weight decay 5e-4 on kernels, biases at 2x LR, 100k iterations, no
augmentation (sec. 4.3: mirroring and jittering did not help). The paper
trains on SBD train (8,498 images) and reports seg11valid; train_aug / val
are this library's nearest splits. ImageNet VGG-16 weights are expected (the
torchvision table is in flaxseg/models/vgg.py); from scratch this learning
rate does nothing useful. A normalised equivalent is about lr 2e-5
(1e-10 times ~2e5 pixels per image) with ``train.normalize_loss=True``.

  python train.py --config=configs/fcn32s.py --workdir=runs/fcn32s \
      --config.data.root=/data/VOCdevkit/VOC2012 \
      --config.data.sbd_root=/data/benchmark_RELEASE/dataset

Variants (``configs/fcn32s.py:NAME``):
  tiny  a few steps of a narrow FCN-32s on tiny synthetic images, for tests.
"""

from configs import common


def get_config(arg=None):
  """Returns the config for variant ``arg`` (None: the paper recipe)."""
  return common.fcn_recipe('fcn32s', 1e-10, 'upscore', arg)
