"""DeepLab v1 LargeFOV on PASCAL VOC 2012 (Chen et al., ICLR 2015).

Atrous VGG-16 at output stride 8 with fc6 3x3 dilation 12, 1024 channels
(sec. 3.1, 4.1, table 2 "DeepLab-LargeFOV"), scores bilinearly upsampled.
Paper recipe (sec. 4.1 "Training"): SGD with mini-batches of 20 images,
initial learning rate 0.001 (0.01 for the final classifier), momentum 0.9,
weight decay 0.0005, learning rate x0.1 every 2000 iterations (6000 in all,
the released solver), on the augmented set (train_aug, 10,582 images) with
crops of 306x306 and mirroring (the released DeepLab-LargeFOV prototxt; v2
moved to 321 and random scaling), evaluated on VOC 2012 val. The trainer's
schedules are 'poly', 'cosine' and 'constant', not Caffe's 'step': 'poly'
(power 0.9, DeepLab v2's policy, which v2 sec. 4.1 found better than step) is
used. Caffe lr_mult conventions are kept through ``optim.lr_multipliers``:
fc8 kernel 10x, fc8 bias 20x, other biases 2x (biases get no weight decay).

ImageNet VGG-16 weights are expected (torchvision table in
flaxseg/models/vgg.py; fc6/fc7 are the paper's subsampled 1024-channel
layers). The fully connected CRF of sec. 4 is post-processing at evaluation:
it plugs in through ``config.eval.crf`` (a later issue) using the upsampled
logits or ``aux['logits_stride8']``; this recipe reports the CRF-free network
(62.25 / 67.64 val mIoU without / with CRF in table 2).

  python train.py --config=configs/deeplabv1.py --workdir=runs/deeplabv1 \
      --config.data.root=/data/VOCdevkit/VOC2012 \
      --config.data.sbd_root=/data/benchmark_RELEASE/dataset

Variants (``configs/deeplabv1.py:NAME``):
  tiny  a few steps of a narrow DeepLab v1 on tiny synthetic images, for
        tests.
"""

from configs import common
from flaxseg.config import default_config


def get_config(arg=None):
  """Returns the config for variant ``arg`` (None: the paper recipe)."""
  c = default_config()
  c.model.name = 'deeplabv1_largefov'
  c.data.train_split = 'train_aug'
  c.data.eval_split = 'val'
  c.data.batch_size = 20
  c.data.crop_size = 306
  c.data.scale_range = (1.0, 1.0)
  c.data.flip = True
  c.data.eval_pad_size = 513
  c.optim.name = 'sgd'
  c.optim.lr = 1e-3
  c.optim.momentum = 0.9
  c.optim.weight_decay = 5e-4
  c.optim.schedule = 'poly'
  c.optim.poly_power = 0.9
  # Regexes must not overlap (keys are matched in sorted order).
  c.optim.lr_multipliers['^fc8/kernel$'] = 10.0
  c.optim.lr_multipliers['^fc8/bias$'] = 20.0
  c.optim.lr_multipliers['^backbone/[^/]+/bias$'] = 2.0
  c.train.num_steps = 6000
  if arg in (None, '', 'paper'):
    return c
  if arg != 'tiny':
    raise ValueError(f'configs/deeplabv1.py: unknown variant {arg!r} '
                     "(expected 'tiny')")
  common.tiny_synthetic(c)
  c.model.width_multiplier = 0.0625
  c.optim.lr = 1e-3
  return c
