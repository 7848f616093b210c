"""U-Net on PASCAL VOC-style data (Ronneberger et al., MICCAI 2015,
arXiv:1505.04597).

The practical U-Net (``unet``: padded convolutions with BatchNorm, 4
poolings, 64 base channels, 2x2 up-convolutions, dropout 0.5 at the bottom)
with the paper's training settings where the trainer supports them (sec.
3): SGD with a high momentum of 0.99 and a batch of one large tile
(``data.batch_size = 1``; on N devices the global batch must be at least N,
so raise it there), crops of 512x512 (VOC images are at most 500 px; the
paper favours large tiles over large batches).

What the trainer does not express, and is documented instead:

* the learning rate and its schedule are not given in the paper; we use 0.001
  (an effective step ``lr / (1 - momentum)`` of 0.1, near the DeepLab
  recipe's 0.07) with poly decay (power 0.9), 160k steps (about 15 epochs of
  train_aug at batch 1) and weight decay 1e-4, as the DeepLab recipes;
* the weighted loss of eq. 2 (class-frequency balancing plus the border
  term ``w0 * exp(-(d1 + d2)^2 / (2 sigma^2))``, w0 = 10, sigma = 5 px) is not
  implemented: the loss is the unweighted pixel cross-entropy with void
  (255) ignored;
* the elastic deformations, shifts, rotations and grey-value variations of
  sec. 3.1 are replaced by the pipeline's random scaling, cropping and
  flipping;
* the paper's network is unpadded without BatchNorm: variant ``original``
  trains it (``unet_original``, overlap-tile inference at any input size).

  python train.py --config=configs/unet.py --workdir=runs/unet \
      --config.data.root=/data/VOCdevkit/VOC2012 \
      --config.data.sbd_root=/data/benchmark_RELEASE/dataset

Variants (``configs/unet.py:NAME``):
  original  the paper's unpadded U-Net (no BatchNorm, dropout 0.5, mirror
        padded overlap-tile inference) with the same optimiser settings.
  tiny  a few steps on tiny images, for tests.
"""

from configs import common
from flaxseg.config import default_config


def get_config(arg=None):
  """Returns the config for variant ``arg`` (None: the practical U-Net)."""
  c = default_config()
  c.model.name = 'unet'
  c.model.depth = 4
  c.model.base_width = 64
  c.model.upsample = 'transposed'
  c.model.dropout = 0.5
  c.model.bn_momentum = 0.9
  c.data.train_split = 'train_aug'
  c.data.eval_split = 'val'
  c.data.crop_size = 512
  c.data.eval_pad_size = 512
  c.data.batch_size = 1
  c.data.eval_batch_size = 1
  c.optim.name = 'sgd'
  c.optim.lr = 0.001
  c.optim.momentum = 0.99
  c.optim.weight_decay = 1e-4
  c.optim.schedule = 'poly'
  c.optim.poly_power = 0.9
  c.train.num_steps = 160000
  if arg in (None, ''):
    return c
  if arg == 'original':
    c.model = default_config().model
    c.model.name = 'unet_original'
    c.model.base_width = 64
    c.model.dropout = 0.5
    return c
  if arg != 'tiny':
    raise ValueError(f'configs/unet.py: unknown variant {arg!r} '
                     "(expected 'original' or 'tiny')")
  # Still the practical U-Net (4 poolings, transposed up-convolutions,
  # BatchNorm), shrunk to 8 base channels and trained for a few steps on tiny
  # synthetic images; Adam with a cosine schedule as the DeepLab v3 tiny
  # variant, since a batch of one with momentum 0.99 does not fit a batch in
  # a handful of steps.
  common.tiny_synthetic(c)
  common.adam_from_scratch(c)
  c.model.base_width = 8
  c.model.dropout = 0.0
  return c
