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

from flaxseg.config import default_config


def get_config(arg=None):
  """Returns the config for variant ``arg`` (None: the paper recipe)."""
  c = default_config()
  c.model.name = 'fcn16s'
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
  c.optim.lr = 1e-12
  c.optim.momentum = 0.99
  c.optim.weight_decay = 5e-4
  c.optim.schedule = 'constant'
  # Caffe lr_mult: biases 2x; the final upsampling is fixed (0x keeps weight
  # decay off it too). Regexes must not overlap (keys are matched sorted).
  c.optim.lr_multipliers['/bias$'] = 2.0
  c.optim.lr_multipliers['^upscore16/kernel$'] = 0.0
  c.train.normalize_loss = False
  c.train.num_steps = 100000
  if arg in (None, '', 'paper'):
    return c
  if arg != 'tiny':
    raise ValueError(f'configs/fcn16s.py: unknown variant {arg!r} '
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
