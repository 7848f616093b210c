"""Pieces shared by the recipe files.

* ``tiny_synthetic``: the ``tiny`` variant every recipe has, a few steps on
  tiny generated images that the tests run.
* ``deeplabv3_training``: DeepLab v3's training recipe, which v3+ reuses.
* ``fcn_recipe``: the FCN-32s/16s/8s recipe of Long, Shelhamer & Darrell
  (PAMI 2016), which differs between the three nets only in the learning rate
  and in which upsampling is fixed.
"""

from flaxseg.config import default_config


def tiny_synthetic(c):
  """Turns ``c`` into the tests' tiny run (synthetic data, 4 steps).

  The data, sizes and run lengths are shared by every recipe, so that the
  tests generate one synthetic tree for all of them; each recipe then shrinks
  its own model (width options) and may change the optimizer.

  Args:
    c: a full config.

  Returns:
    ``c``, changed in place.
  """
  c.data.dataset = 'synthetic'
  c.data.num_classes = 7
  c.data.train_split = 'train'
  c.data.eval_split = 'val'
  c.data.synthetic.num_train = 16
  c.data.synthetic.num_val = 8
  c.data.synthetic.min_size = 24
  c.data.synthetic.max_size = 32
  c.data.crop_size = 33          # 8k + 1 (see flaxseg.config)
  c.data.eval_pad_size = 33
  c.data.scale_range = (0.75, 1.25)
  c.data.batch_size = 4
  c.data.eval_batch_size = 4
  c.optim.warmup_steps = 0
  c.train.num_steps = 4
  c.train.log_every_steps = 2
  c.eval.every_steps = 0
  c.eval.num_visualize = 2
  c.checkpoint.every_steps = 2
  return c


def adam_from_scratch(c):
  """AdamW 3e-3 with cosine decay: the optimizer of the from-scratch demo
  and tiny runs (no ImageNet initialisation, few steps; see BENCHMARKS.md)."""
  c.optim.name = 'adamw'
  c.optim.lr = 0.003
  c.optim.weight_decay = 1e-4
  c.optim.schedule = 'cosine'
  return c


def deeplabv3_training(c):
  """DeepLab v3's training recipe (Chen et al. 2017, sec. 4.1), kept by v3+.

  train_aug / val, crop 513, global batch 16, SGD momentum 0.9, LR 0.007 with
  the poly policy (power 0.9), weight decay 1e-4, 30k steps (v3+, Chen et al.
  ECCV 2018, sec. 4, trains its ResNet models the same way).

  Args:
    c: a full config.

  Returns:
    ``c``, changed in place.
  """
  c.data.train_split = 'train_aug'
  c.data.eval_split = 'val'
  c.data.crop_size = 513
  c.data.batch_size = 16
  c.optim.lr = 0.007
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-4
  c.optim.schedule = 'poly'
  c.optim.poly_power = 0.9
  c.train.num_steps = 30000
  return c


def demo_synthetic(c):
  """The demos' data (``make demo`` and the other ``demo`` variants).

  2,000 train / 100 val synthetic images of 64-96 px, 97 crops (8k + 1, see
  flaxseg.config) equal to the eval padding, mild scaling, batch 8. Images
  no larger than the crop: like the paper's 513 crops on VOC's <= 500 px
  images, training then sees the same padding as evaluation (evaluating at a
  much larger padded size cost 20+ mIoU points, BENCHMARKS.md).

  Args:
    c: a full config.

  Returns:
    ``c``, changed in place.
  """
  c.data.dataset = 'synthetic'
  c.data.num_classes = 7
  c.data.train_split = 'train'
  c.data.synthetic.num_train = 2000
  c.data.synthetic.num_val = 100
  c.data.synthetic.min_size = 64
  c.data.synthetic.max_size = 96
  c.data.crop_size = 97
  c.data.scale_range = (0.75, 1.25)
  c.data.batch_size = 8
  c.data.eval_batch_size = 8
  c.data.eval_pad_size = 97
  return c


def fcn_recipe(name: str, lr: float, fixed_upsampling: str, arg=None):
  """FCN-{32,16,8}s on PASCAL VOC, PAMI 2016 "heavy learning" recipe.

  SGD with momentum 0.99, batch 1 (whole images: crop 500 = VOC's largest
  side, padding ignored), a fixed learning rate on the unnormalised loss
  (summed over pixels), weight decay 5e-4 on kernels, biases at 2x LR (Caffe
  ``lr_mult``), the final upsampling fixed to bilinear (0x, which also keeps
  weight decay off it), 100k iterations, no augmentation (sec. 4.3: mirroring
  and jittering did not help), the paper's pad-100 layout.

  Args:
    name: 'fcn32s', 'fcn16s' or 'fcn8s'.
    lr: the fixed learning rate (released solvers: 1e-10, 1e-12, 1e-14).
    fixed_upsampling: parameter name of the final, fixed upsampling.
    arg: variant: None for the paper recipe, 'tiny' for tests.

  Returns:
    The config.
  """
  c = default_config()
  c.model.name = name
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
  c.optim.lr = lr
  c.optim.momentum = 0.99
  c.optim.weight_decay = 5e-4
  c.optim.schedule = 'constant'
  # Regexes must not overlap (keys are matched sorted).
  c.optim.lr_multipliers['/bias$'] = 2.0
  c.optim.lr_multipliers[f'^{fixed_upsampling}/kernel$'] = 0.0
  c.train.normalize_loss = False
  c.train.num_steps = 100000
  if arg in (None, '', 'paper'):
    return c
  if arg != 'tiny':
    raise ValueError(f'configs/{name}.py: unknown variant {arg!r} '
                     "(expected 'tiny')")
  tiny_synthetic(c)
  c.data.scale_range = (1.0, 1.0)
  c.model.width_multiplier = 0.0625
  c.optim.lr = 1e-3
  c.optim.momentum = 0.9
  c.train.normalize_loss = True
  return c
