"""FCN-16s on PASCAL VOC (Long, Shelhamer & Darrell, CVPR 2015 / PAMI 2016).

FCN-32s plus one skip (sec. 4.2): score_fr upsampled 2x by a learned
transposed convolution (bilinear-initialised) is summed with a zero-initialised
1x1 score of pool4 (cropped by 5 in the paper's pad-100 layout), then
upsampled 16x by a fixed bilinear filter. The paper trains it "end-to-end,
initialized with the parameters of the last, coarser net" (FCN-32s) at a
learning rate 100 times lower: fixed 1e-12 on the unnormalised loss (the
released voc-fcn16s solver), otherwise the FCN-32s recipe: SGD momentum 0.99,
batch 1 whole images, weight decay 5e-4, biases at 2x LR, 100k iterations,
no augmentation. Initialising from an FCN-32s checkpoint is a weight-import
step (not done by this config).

  python train.py --config=configs/fcn16s.py --workdir=runs/fcn16s \
      --config.data.root=/data/VOCdevkit/VOC2012 \
      --config.data.sbd_root=/data/benchmark_RELEASE/dataset

Variants (``configs/fcn16s.py:NAME``):
  tiny  a few steps of a narrow FCN-16s on tiny synthetic images, for tests.
"""

from configs import common


def get_config(arg=None):
  """Returns the config for variant ``arg`` (None: the paper recipe)."""
  return common.fcn_recipe('fcn16s', 1e-12, 'upscore16', arg)
