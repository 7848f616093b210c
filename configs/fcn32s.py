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

from flaxseg.config import default_config


def get_config(arg=None):
  """Returns the config for variant ``arg`` (None: the paper recipe)."""
  c = default_config()
  c.model.name = 'fcn32s'
  c.model.padding = 'paper'
  c.data.train_split = 'train_aug'
  c.data.eval_split = 'val'
  c.data.batch_size = 1
  c.data.crop_size = 500
  c.data.scale_range = (1.0, 1.0)
  c.data.flip = False
  c.data.eval_batch_size = 1
  c.data.eval_pad_size = 500
  c.optim.name = 'sgd'
  c.optim.lr = 1e-10
  c.optim.momentum = 0.99
  c.optim.weight_decay = 5e-4
  c.optim.schedule = 'constant'
  # Caffe lr_mult: biases 2x; the final upsampling is fixed (0x keeps weight
  # decay off it too). Regexes must not overlap (keys are matched sorted).
  c.optim.lr_multipliers['/bias$'] = 2.0
  c.optim.lr_multipliers['^upscore/kernel$'] = 0.0
  c.train.normalize_loss = False
  c.train.num_steps = 100000
  if arg in (None, '', 'paper'):
    return c
  if arg != 'tiny':
    raise ValueError(f'configs/fcn32s.py: unknown variant {arg!r} '
                     "(expected 'tiny')")
  c.data.dataset = 'synthetic'
  c.data.num_classes = 7
  c.data.train_split = 'train'
  c.data.synthetic.num_train = 16
  c.data.synthetic.num_val = 8
  c.data.synthetic.min_size = 24
  c.data.synthetic.max_size = 32
  c.data.crop_size = 33
  c.data.eval_pad_size = 33
  c.data.batch_size = 4
  c.data.eval_batch_size = 4
  c.model.width_multiplier = 0.0625
  c.optim.lr = 1e-3
  c.optim.momentum = 0.9
  c.train.normalize_loss = True
  c.train.num_steps = 4
  c.train.log_every_steps = 2
  c.eval.every_steps = 0
  c.eval.num_visualize = 2
  c.checkpoint.every_steps = 2
  return c
