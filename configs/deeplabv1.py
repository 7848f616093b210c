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
layers).

Dense CRF (sec. 4.1, table 2: 62.25 val mIoU without, 67.64 with the CRF for
DeepLab-LargeFOV; the paper's headline numbers are with it), so this recipe
evaluates with ``config.eval.crf.enabled = True``: 10 mean-field iterations
on the upsampled logits, Potts compatibility, the released DeepLab-LargeFOV
settings (deeplab-public): appearance kernel w1 = bi_w = 4, sigma_alpha =
bi_xy_std = 121 px, sigma_beta = bi_rgb_std = 5; smoothness kernel w2 = pos_w
= 3, sigma_gamma = pos_xy_std = 3 px (sec. 4.1 fixes w2 = 3 and sigma_gamma =
3 and cross-validates the others on 100 val images with a coarse-to-fine
search from w1 in [5, 10], sigma_alpha in [50:10:100], sigma_beta in [3:6]:
``python -m flaxseg.crf.search``). ``--config.eval.crf.enabled=False``
reports the network alone; with the CRF on, the eval logs and JSON carry both
numbers.

  python train.py --config=configs/deeplabv1.py --workdir=runs/deeplabv1 \
      --config.data.root=/data/VOCdevkit/VOC2012 \
      --config.data.sbd_root=/data/benchmark_RELEASE/dataset

Variants (``configs/deeplabv1.py:NAME``):
  demo  DeepLab v1 LargeFOV shrunk for a 2-core CPU (1/4-width VGG-16, fc6
        dilation 4), briefly trained from scratch on the synthetic set and
        evaluated with and without the dense CRF (BENCHMARKS.md).
  tiny  a few steps of a narrow DeepLab v1 on tiny synthetic images, for
        tests (CRF off).
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
  # The dense CRF, sec. 4.1 (values above; default_config holds the same).
  c.eval.crf.enabled = True
  c.eval.crf.num_iterations = 10
  c.eval.crf.bi_w = 4.0
  c.eval.crf.bi_xy_std = 121.0
  c.eval.crf.bi_rgb_std = 5.0
  c.eval.crf.pos_w = 3.0
  c.eval.crf.pos_xy_std = 3.0
  if arg in (None, '', 'paper'):
    return c
  if arg == 'demo':
    return _demo(c)
  if arg != 'tiny':
    raise ValueError(f'configs/deeplabv1.py: unknown variant {arg!r} '
                     "(expected 'demo' or 'tiny')")
  common.tiny_synthetic(c)
  c.model.width_multiplier = 0.0625
  c.optim.lr = 1e-3
  c.eval.crf.enabled = False
  return c


def _demo(c):
  """DeepLab v1 LargeFOV on the synthetic set, sized for a 2-core CPU.

  The data and optimizer are configs/deeplabv3.py:demo's (64-96 px images,
  97 crops = eval pad, Adam 3e-3 + cosine from scratch: there is no ImageNet
  VGG-16 here); the network is the LargeFOV head on a 1/4-width VGG-16 with
  fc6's dilation scaled with the images (4 on a 13x13 stride-8 map instead of
  12 on VOC's 39x39 or larger), trained briefly. The CRF keeps the paper's
  VOC settings (BENCHMARKS.md compares them with the grid search's best on
  these small images).
  """
  common.demo_synthetic(c)
  c.model.width_multiplier = 0.25
  c.model.fc6_dilation = 4
  c.model.dropout = 0.5
  common.adam_from_scratch(c)
  c.optim.lr_multipliers = {}
  c.optim.warmup_steps = 100
  c.train.num_steps = 1500
  c.train.log_every_steps = 100
  c.eval.every_steps = 0
  c.checkpoint.every_steps = 500
  return c
