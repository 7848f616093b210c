"""The configuration schema: every key the trainer reads, with its default.

Recipe files in ``configs/`` start from ``default_config()`` and change
values; ``validate_config`` rejects any key the trainer does not know (a typo
in a recipe would otherwise be silently ignored), naming it. The ``model``
section is free-form: its keys are keyword arguments of the model constructor,
which rejects unknown ones itself (``flaxseg.models.create_model``).
"""

from __future__ import annotations

import numbers

import ml_collections

from flaxseg.crf.meanfield import BACKENDS as CRF_BACKENDS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_config() -> ml_collections.ConfigDict:
  """All trainer keys with neutral defaults (the DeepLab v3 recipe values)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # 'pmap' (default) or 'shard_map': see flaxseg.train.parallel.
  c.parallel = 'pmap'
  # Multi-host start-up (flaxseg.train.distributed): 'auto' initialises JAX's
  # distributed runtime when coordinator_address is set or JAX detects a
  # cluster (TPU pod slice, SLURM, Open MPI); 'on' always, 'off' never.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.mode = 'auto'
  c.distributed.coordinator_address = ''   # 'host:port' of process 0
  c.distributed.num_processes = 0          # 0: from the cluster
  c.distributed.process_id = -1            # -1: from the cluster
  c.distributed.local_device_ids = ''      # e.g. '0,1' (GPU hosts)
  c.distributed.cpu_collectives = 'gloo'   # CPU cross-process collectives
  c.distributed.initialization_timeout = 300

  c.model = ml_collections.ConfigDict()
  c.model.name = 'deeplabv3_resnet101'
  c.model.dtype = 'float32'
  # Warm starts (flaxseg.train.warm_start), ignored when the workdir already
  # has checkpoints (the run resumes from those). backbone_init: ImageNet
  # weights for the backbone, a directory from `python -m flaxseg.convert
  # backbone` or a torchvision .pth / .safetensors classifier file.
  # init_from: a flaxseg workdir, its checkpoints/ or one step directory, or
  # a converted torchvision model; every array there must exist in this
  # model with the same shape, arrays it lacks keep their initial values
  # (CRF-RNN's stage 2 from an FCN-8s run).
  c.model.backbone_init = ''
  c.model.init_from = ''

  c.data = ml_collections.ConfigDict()
  # 'voc' reads data.root (+ data.sbd_root for train_aug); 'synthetic'
  # generates a VOC-format tree into data.root (default: WORKDIR/synthetic_voc)
  # and reads it with the same VOC reader.
  c.data.dataset = 'voc'
  c.data.root = ''
  c.data.sbd_root = ''
  c.data.num_classes = 21
  c.data.train_split = 'train_aug'
  c.data.eval_split = 'val'
  c.data.batch_size = 16          # global, over all devices and processes
  c.data.crop_size = 513
  c.data.scale_range = (0.5, 2.0)
  c.data.flip = True
  c.data.mean = IMAGENET_MEAN
  c.data.std = IMAGENET_STD
  c.data.eval_batch_size = 8
  # VOC images are at most 500x500; 513 = 32 * 16 + 1 keeps the feature grid
  # on input pixels (TF DeepLab's eval crop).
  c.data.eval_pad_size = 513
  c.data.num_parallel_calls = -1  # -1: tf.data.AUTOTUNE
  c.data.prefetch_to_device = 2
  # An image/mask that cannot be read or fails validation: 'raise' (stop,
  # naming the file) or 'skip' (training takes the next readable record in
  # its place, evaluation leaves it out; each one is logged and counted).
  c.data.on_bad_example = 'raise'
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.num_train = 400
  c.data.synthetic.num_val = 100
  c.data.synthetic.min_size = 96
  c.data.synthetic.max_size = 160

  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'sgd'
  c.optim.lr = 0.007
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.weight_decay = 1e-4
  c.optim.schedule = 'poly'
  c.optim.poly_power = 0.9
  c.optim.end_lr = 0.0
  c.optim.warmup_steps = 0
  c.optim.grad_clip_norm = 0.0
  c.optim.lr_multipliers = ml_collections.ConfigDict()

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 30000
  c.train.aux_loss_weight = 0.0
  # Loss weight on each input scale's logits (models with multi-scale
  # inputs, DeepLab v2 sec. 4.1: 1.0).
  c.train.scale_loss_weight = 0.0
  c.train.normalize_loss = True
  c.train.log_every_steps = 50
  # Cross-device sums (gradients, losses, BatchNorm statistics): 'psum'
  # (jax.lax.psum) or 'ordered' (all_gather + sum in device order: sums with
  # the same bits on any process/device layout; see flaxseg.collectives).
  c.train.reduction = 'psum'
  # A non-finite loss or gradient: 'raise' (stop with FloatingPointError
  # naming the step; no checkpoint is written after it) or 'skip' (leave the
  # state unchanged for that step, count it in the logs, and stop once more
  # than max_nonfinite_skips updates were skipped).
  c.train.on_nonfinite = 'raise'
  c.train.max_nonfinite_skips = 100

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 2000       # 0: only at the end
  c.eval.num_images = -1          # -1: the whole split
  c.eval.num_visualize = 8        # prediction pictures written per eval
  # Inference mode (flaxseg.inference), shared by training-time eval,
  # --mode=eval, python -m flaxseg.predict and the export. Single scale by
  # default; DeepLab v3's best VOC val result (sec. 4.1, "inference
  # strategy": 77.21 mIoU at output stride 16 -> 79.77) evaluates at output
  # stride 8 with scales (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) and left/right
  # flips, averaging softmax probabilities as the TF DeepLab code does
  # (merge='probs'); configs/deeplabv3.py:paper_eval selects it.
  c.eval.scales = (1.0,)
  c.eval.flip = False
  c.eval.merge = 'probs'          # 'probs' (TF DeepLab, mmseg) or 'logits'
  # Sliding window (mmsegmentation's slide mode): (0, 0) = whole inputs,
  # else the window (h, w); stride (0, 0) = 2/3 of the window.
  c.eval.window = (0, 0)
  c.eval.window_stride = (0, 0)
  # 0: evaluate at the training output stride; DeepLab v3 trains at 16 and
  # evaluates at 8 (same parameters, denser features).
  c.eval.output_stride = 0
  # Dense-CRF post-processing of the eval predictions (DeepLab v1/v2): the
  # upsampled logits are the unary (-U = log softmax), mean-field inference
  # as flaxseg.crf.dense_crf, then the argmax. Off here; the DeepLab v1/v2
  # recipes turn it on. The values are DeepLab v1 LargeFOV's (Chen et al.,
  # ICLR 2015, sec. 4.1: 10 mean-field iterations, w2 = 3 and sigma_gamma = 3
  # fixed, w1 / sigma_alpha / sigma_beta cross-validated on 100 val images;
  # the released DeepLab-LargeFOV model's settings in deeplab-public:
  # bi_w=4, bi_xy_std=121, bi_rgb_std=5, pos_w=3, pos_xy_std=3). Bandwidths
  # are in pixels and 0..255 colour units, tuned for VOC's <= 500 px images.
  c.eval.crf = ml_collections.ConfigDict()
  c.eval.crf.enabled = False
  c.eval.crf.num_iterations = 10
  c.eval.crf.bi_w = 4.0           # appearance (bilateral) kernel weight w1
  c.eval.crf.bi_xy_std = 121.0    # its spatial std sigma_alpha (pixels)
  c.eval.crf.bi_rgb_std = 5.0     # its colour std sigma_beta (0..255 units)
  c.eval.crf.pos_w = 3.0          # smoothness (positional) kernel weight w2
  c.eval.crf.pos_xy_std = 3.0     # its spatial std sigma_gamma (pixels)
  # 'permutohedral' (pydensecrf's lattice, what DeepLab used), 'exact'
  # (O(N^2) memory: small images only) or 'window' (ConvCRF, 11x11 window).
  c.eval.crf.backend = 'permutohedral'

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 1000
  c.checkpoint.max_to_keep = 3
  c.checkpoint.async_save = True
  return c


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` naming every key the trainer would not read.

  Args:
    config: a full run config.
  """
  reference = default_config()
  unknown = []

  def walk(cfg, ref, prefix):
    for key in cfg.keys():
      path = f'{prefix}{key}'
      if path in ('model', 'optim.lr_multipliers'):
        continue  # free-form sections
      if key not in ref:
        unknown.append(path)
      elif isinstance(ref[key], ml_collections.ConfigDict):
        if not isinstance(cfg[key], (dict, ml_collections.ConfigDict)):
          unknown.append(f'{path} (should be a section)')
        else:
          walk(cfg[key], ref[key], path + '.')
  walk(config, reference, '')
  if 'name' not in config.get('model', {}):
    unknown.append('model.name (missing)')
  if unknown:
    raise ValueError('unknown or malformed config keys: ' +
                     ', '.join(f'config.{k}' for k in unknown))
  if 'crf' in config.get('eval', {}):
    validate_crf(config.eval.crf)
  validate_inference(config.get('eval', {}))


def validate_inference(eval_config) -> None:
  """Raises ``ValueError`` naming each bad inference key of ``config.eval``.

  Args:
    eval_config: the ``eval`` section.
  """
  errors = []

  def size_ok(value):
    if isinstance(value, bool):
      return False
    if isinstance(value, int):
      return value >= 0
    if not isinstance(value, (tuple, list)) or len(value) != 2:
      return False
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
      return False
    return tuple(value) == (0, 0) or min(value) > 0

  scales = eval_config.get('scales', (1.0,))
  if (not isinstance(scales, (tuple, list)) or not scales or
      not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and
              v > 0 for v in scales)):
    errors.append(f'config.eval.scales={scales!r} must be a non-empty '
                  'sequence of positive numbers')
  if not isinstance(eval_config.get('flip', False), bool):
    errors.append(f'config.eval.flip={eval_config.get("flip")!r} must be '
                  'True or False')
  if eval_config.get('merge', 'probs') not in ('probs', 'logits'):
    errors.append(f'config.eval.merge={eval_config.get("merge")!r} must be '
                  "'probs' or 'logits'")
  for key in ('window', 'window_stride'):
    if not size_ok(eval_config.get(key, 0)):
      errors.append(f'config.eval.{key}={eval_config.get(key)!r} must be '
                    '(0, 0) (off) or a positive (height, width)')
  stride = eval_config.get('output_stride', 0)
  if stride not in (0, 8, 16, 32) or isinstance(stride, bool):
    errors.append(f'config.eval.output_stride={stride!r} must be 0 (the '
                  'training one), 8, 16 or 32')
  if errors:
    raise ValueError('invalid inference settings: ' + '; '.join(errors))


def validate_crf(crf) -> None:
  """Raises ``ValueError`` naming each bad value of a ``config.eval.crf``.

  Args:
    crf: the ``eval.crf`` section (keys as in :func:`default_config`).
  """
  errors = []

  def number(key, minimum, strict):
    if key not in crf:
      return
    value = crf[key]
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and (value > minimum if strict else value >= minimum))
    if not ok:
      errors.append(f'config.eval.crf.{key}={value!r} must be a number '
                    f'{">" if strict else ">="} {minimum}')

  if 'enabled' in crf and not isinstance(crf.enabled, bool):
    errors.append(f'config.eval.crf.enabled={crf.enabled!r} must be True or '
                  'False')
  if 'num_iterations' in crf and not (
      isinstance(crf.num_iterations, int)
      and not isinstance(crf.num_iterations, bool)
      and crf.num_iterations >= 0):
    errors.append(f'config.eval.crf.num_iterations={crf.num_iterations!r} '
                  'must be an integer >= 0')
  for key in ('bi_w', 'pos_w'):
    number(key, 0, strict=False)
  for key in ('bi_xy_std', 'bi_rgb_std', 'pos_xy_std'):
    number(key, 0, strict=True)
  if 'backend' in crf and crf.backend not in CRF_BACKENDS:
    errors.append(f'config.eval.crf.backend={crf.backend!r} must be one of '
                  f'{CRF_BACKENDS}')
  if errors:
    raise ValueError('invalid CRF settings: ' + '; '.join(errors))
