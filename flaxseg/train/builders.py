"""What a run is made of: its data root, model, fresh state and metadata.

Shared by training (``flaxseg.train.loop``), evaluation
(``flaxseg.train.evaluator``), ``python -m flaxseg.predict`` and
``python -m flaxseg.export``, so each builds the same model from the same
config. A run's config is saved as ``WORKDIR/config.json`` at the start of
training; :func:`load_run_config` reads it back for the command-line tools.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, Optional

import jax
import ml_collections

from flaxseg import collectives, models
from flaxseg.checkpoint import Checkpoints
from flaxseg.data import synthetic, voc
from flaxseg.train import optim, parallel, warm_start
from flaxseg.train.state import TrainState, create_train_state

#: The run config that training writes into its workdir.
CONFIG_FILE = 'config.json'

#: ``config.model`` keys that change how a model is computed, not its
#: parameters or function: a checkpoint restores whatever they are.
COMPUTE_ONLY_KEYS = ('remat', 'conv_impl', 'scan_blocks')


def log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def log_every_process(msg: str) -> None:
  """Prints on every process (what only that process saw), tagged."""
  if jax.process_count() > 1:
    msg = f'[process {jax.process_index()}] {msg}'
  print(msg, flush=True)



def dataset_root(config, workdir: str) -> str:
  """The VOC root to read; generates the synthetic set when configured."""
  data = config.data
  if data.dataset == 'synthetic':
    root = data.root or os.path.join(workdir, 'synthetic_voc')
    if len(synthetic.SYNTH_CLASSES) != data.num_classes:
      raise ValueError(
          f'config.data.num_classes is {data.num_classes} but the synthetic '
          f'set has {len(synthetic.SYNTH_CLASSES)} classes')
    return ensure_synthetic(root, data.synthetic.to_dict(), config.seed)
  if data.dataset != 'voc':
    raise ValueError(f"config.data.dataset: unknown dataset {data.dataset!r} "
                     "(expected 'voc' or 'synthetic')")
  if not data.root:
    raise ValueError('config.data.root is empty: point it at VOCdevkit/VOC2012 '
                     "(or use config.data.dataset='synthetic')")
  return data.root


def ensure_synthetic(root: str, params: Dict[str, int], seed: int) -> str:
  """Generates the synthetic VOC tree at ``root`` once; returns VOC2012's path.

  The tree is written to a temporary sibling and renamed into place, so an
  interrupted generation never leaves a half-written dataset behind; a JSON
  marker records the generator arguments, and a tree made with other
  arguments is refused rather than silently reused.
  """
  wanted = dict(params, seed=int(seed))
  marker = os.path.join(root, 'flaxseg_synthetic.json')
  voc_root = os.path.join(root, 'VOCdevkit', 'VOC2012')
  if os.path.exists(marker):
    with open(marker) as f:
      found = json.load(f)
    if found != wanted:
      raise ValueError(
          f'{root} holds a synthetic set generated with {found}, but the '
          f'config asks for {wanted}: delete it or set config.data.root')
    return voc_root
  if os.path.exists(root) and os.listdir(root):
    raise ValueError(f'{root} exists and is not a flaxseg synthetic set '
                     f'(no {os.path.basename(marker)}): refusing to write there')
  tmp = f'{root}.tmp-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  log(f'generating the synthetic VOC-format set in {root} ...')
  synthetic.generate_voc_tree(
      tmp, num_train=params['num_train'], num_val=params['num_val'],
      seed=int(seed), image_size=(params['min_size'], params['max_size']))
  with open(os.path.join(tmp, os.path.basename(marker)), 'w') as f:
    json.dump(wanted, f)
  try:
    if os.path.exists(root):
      os.rmdir(root)
    os.replace(tmp, root)
  except OSError:
    # Another process (a multi-host run on a shared disk) got there first.
    shutil.rmtree(tmp, ignore_errors=True)
    if not os.path.exists(marker):
      raise
    return ensure_synthetic(root, params, seed)
  return voc_root


def class_names(config):
  """Class names for reports."""
  if config.data.dataset == 'synthetic':
    return list(synthetic.SYNTH_CLASSES)
  names = list(voc.VOC_CLASSES)
  return names if len(names) == config.data.num_classes else None


def build_model(config, axis_name: Optional[str] = parallel.AXIS,
                output_stride: Optional[int] = None):
  """The model named by ``config.model`` with synchronised BatchNorm.

  Args:
    config: the run config.
    axis_name: BatchNorm's data-parallel axis.
    output_stride: build the model at another output stride than it was
      trained at (DeepLab v3 sec. 4.1 trains at 16 and evaluates at 8): the
      parameters are the same; explicit ``aspp_rates`` are rescaled with it.
      ``None`` or 0: as configured.

  Raises:
    ValueError: naming ``config.eval.output_stride`` for a model without an
      output stride.
  """
  kwargs = dict(config.model)
  name = kwargs.pop('name')
  for key in warm_start.KEYS:      # the trainer's, not the model's
    kwargs.pop(key, None)
  accepted = models.accepted_kwargs(name)
  if output_stride:
    if 'output_stride' not in accepted:
      raise ValueError(f'config.eval.output_stride={output_stride}: model '
                       f'{name!r} has no output stride to change')
    trained = kwargs.get('output_stride') or models.default_kwargs(name).get(
        'output_stride')
    if kwargs.get('aspp_rates'):
      kwargs['aspp_rates'] = tuple(
          max(1, int(r) * int(trained) // int(output_stride))
          for r in kwargs['aspp_rates'])
    kwargs['output_stride'] = int(output_stride)
  # Models that need raw colours (CRF-RNN) undo the data's normalisation.
  for key, value in (('pixel_mean', config.data.mean),
                     ('pixel_std', config.data.std)):
    if key in accepted and key not in kwargs:
      kwargs[key] = tuple(value)
  axis_name = collectives.axis_name_for(
      axis_name, config.get('train', {}).get('reduction', 'psum'))
  return models.create_model(name, num_classes=config.data.num_classes,
                             bn_axis_name=axis_name, **kwargs)


def initial_state(config, model) -> TrainState:
  """A fresh state (step 0) on the host."""
  tx = optim.create_optimizer(config.optim, config.train.num_steps)
  crop = int(config.data.crop_size)
  return create_train_state(model, tx, jax.random.key(config.seed),
                            (1, crop, crop, 3))


def run_meta(config) -> Dict[str, Any]:
  """What a checkpoint records about the run that wrote it."""
  # init_from / backbone_init only say where step 0 came from, and the
  # COMPUTE_ONLY_KEYS only how the same function is computed: not part of the
  # model, so a run resumes (or is evaluated) whatever they say.
  model = {k: v for k, v in config.model.to_dict().items()
           if k not in warm_start.KEYS and k not in COMPUTE_ONLY_KEYS}
  return {
      'model': model,
      **{k: config.model.get(k) or '' for k in warm_start.KEYS},
      'num_classes': int(config.data.num_classes),
      'data': {'seed': int(config.seed),
               'global_batch_size': int(config.data.batch_size),
               'crop_size': int(config.data.crop_size)},
  }


def restore_latest(ckpts: Checkpoints, state: TrainState, config,
                   step: Optional[int] = None) -> TrainState:
  """``state`` with the arrays of the latest (or given) checkpoint."""
  tree, meta = ckpts.restore(state.checkpoint_tree(), run_meta(config), step,
                             check_keys=('model', 'num_classes', 'data'))
  del meta
  return state.replace_from_checkpoint(tree)


def save_run_config(config, workdir: str) -> str:
  """Writes ``config`` as ``WORKDIR/config.json`` (process 0; atomic)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if jax.process_index() == 0:
    with open(path + '.tmp', 'w') as f:
      f.write(config.to_json_best_effort(indent=1, sort_keys=True))
    os.replace(path + '.tmp', path)
  return path


def _tuples(value):
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def config_from_dict(data: Dict[str, Any]) -> ml_collections.ConfigDict:
  """A ConfigDict from JSON data (lists become tuples, as configs write them)."""
  return ml_collections.ConfigDict(_tuples(data))


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run saved in ``workdir`` (lists come back as tuples).

  Raises:
    FileNotFoundError: naming the file when the run saved none (pass the
      recipe with ``--config`` instead).
    ValueError: naming the file when it is not a config.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'{path} does not exist: {workdir} is not a flaxseg run directory '
        '(or predates saved configs); pass the recipe with --config')
  try:
    with open(path) as f:
      data = json.load(f)
    if not isinstance(data, dict) or 'model' not in data:
      raise ValueError('no model section')
  except ValueError as e:
    raise ValueError(f'{path} is not a flaxseg run config ({e})') from e
  return config_from_dict(data)
