"""Grid search of the dense-CRF parameters on val images, as DeepLab did.

DeepLab v1 (Chen et al., ICLR 2015, sec. 4.1) fixes the smoothness kernel
(w2 = 3, sigma_gamma = 3) and cross-validates the appearance kernel's weight
w1 and bandwidths sigma_alpha (position) and sigma_beta (colour) on 100 val
images, coarse to fine, from w1 in [5, 10], sigma_alpha in [50:10:100],
sigma_beta in [3:6] (MATLAB ranges), with 10 mean-field iterations; DeepLab v2
(Chen et al., TPAMI 2017, sec. 4.1) repeats the protocol per model. This
command is one step of such a search: it restores the latest checkpoint of a
run, computes the network's logits on the first ``--num_images`` val images
once, evaluates the CRF for every combination of the grid (and for the
config's own ``config.eval.crf`` setting), prints a table of mIoU per setting
next to the network's own mIoU, the best setting and the overrides that
select it, and writes ``WORKDIR/crf_search_STEP.json``::

  python -m flaxseg.crf.search --config=configs/deeplabv1.py --workdir=RUN \\
      [--num_images=100] [--bi_w=5,10] [--bi_xy_std=50:10:100] \\
      [--bi_rgb_std=3:6] [--pos_w=3] [--pos_xy_std=3]

Grid values are comma-separated numbers or MATLAB ranges ``start:step:stop``
/ ``start:stop``; the defaults are v1's initial ranges above (48 settings).
``config.eval.crf.num_iterations`` and ``.backend`` apply to every setting.

Cost. The appearance kernel's lattice depends on sigma_alpha and sigma_beta
only, so the weights (w1, w2) of one bandwidth combination are evaluated
together, vectorised over one lattice; the weights and bandwidths are traced,
so the whole grid compiles once. Logits stay in device memory (about 22 MB
per 513x513 VOC image with 21 classes).

Like ``train.py``, this is a command on top of the trainer (it reuses its
model, checkpoint and eval-data helpers); the rest of ``flaxseg.crf`` imports
nothing from the trainer.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import ml_collections
import numpy as np

from flaxseg import metrics as metrics_lib
from flaxseg.config import validate_config
from flaxseg.data import voc
from flaxseg.train import loop, parallel, step as step_lib

#: DeepLab v1's initial search ranges (sec. 4.1), w2 and sigma_gamma fixed.
DEFAULT_GRID = {
    'bi_w': (5.0, 10.0),
    'bi_xy_std': (50.0, 60.0, 70.0, 80.0, 90.0, 100.0),
    'bi_rgb_std': (3.0, 4.0, 5.0, 6.0),
    'pos_w': (3.0,),
    'pos_xy_std': (3.0,),
}
#: Setting keys in table order; the first two are vectorised (weights).
WEIGHT_KEYS = ('bi_w', 'pos_w')
BANDWIDTH_KEYS = ('bi_xy_std', 'bi_rgb_std', 'pos_xy_std')
SETTING_KEYS = ('bi_w', 'bi_xy_std', 'bi_rgb_std', 'pos_w', 'pos_xy_std')


def parse_values(text: str) -> List[float]:
  """``'5,10'``, ``'50:10:100'`` or ``'3:6'`` (MATLAB ranges) -> floats.

  Args:
    text: comma-separated items, each a number or ``start:[step:]stop``
      (stop included, step 1 by default).

  Returns:
    The values, in order, duplicates removed.

  Raises:
    ValueError: naming the item that is not a number or a valid range.
  """
  values = []
  for item in str(text).split(','):
    item = item.strip()
    if not item:
      continue
    try:
      parts = [float(p) for p in item.split(':')]
    except ValueError:
      raise ValueError(f'grid value {item!r} is not a number or a '
                       'start:step:stop range') from None
    if len(parts) == 1:
      values.append(parts[0])
      continue
    if len(parts) not in (2, 3):
      raise ValueError(f'grid range {item!r} must be start:stop or '
                       'start:step:stop')
    start, step, stop = (parts[0], 1.0, parts[1]) if len(parts) == 2 else parts
    if step <= 0 or stop < start:
      raise ValueError(f'grid range {item!r} must have step > 0 and '
                       'stop >= start')
    count = int(np.floor((stop - start) / step + 1e-9)) + 1
    values.extend(float(start + i * step) for i in range(count))
  if not values:
    raise ValueError(f'empty grid {text!r}')
  return list(dict.fromkeys(values))


def validate_grid(grid: Dict[str, Sequence[float]]) -> None:
  """Raises ``ValueError`` naming the first bad key or value of ``grid``."""
  unknown = sorted(set(grid) - set(SETTING_KEYS))
  if unknown:
    raise ValueError(f'unknown CRF grid keys {unknown} (expected '
                     f'{list(SETTING_KEYS)})')
  for key in SETTING_KEYS:
    values = grid.get(key, ())
    if not values:
      raise ValueError(f'CRF grid {key!r} is empty')
    for v in values:
      bad = v < 0 if key in WEIGHT_KEYS else v <= 0
      if bad or not np.isfinite(v):
        raise ValueError(f'CRF grid {key}={v!r}: weights must be >= 0 and '
                         'standard deviations > 0')


def _cache_logits(config, dp: parallel.DataParallel, dstate, records):
  """The eval batches of ``records`` on the devices, with the logits."""
  p_logits = dp.map(
      lambda s, b, axis_name: step_lib.predict_logits(s, b['image']),
      parallel.SHARDED)
  batches = []
  for batch in loop.eval_stream(config, records).as_numpy_iterator():
    inputs = dp.put_batch({k: batch[k] for k in (
        'image', 'label', 'valid', 'height', 'width')})
    inputs['logits'] = p_logits(dstate, inputs)
    batches.append(inputs)
  return batches


def _crf_confusions(config, dp: parallel.DataParallel) -> Callable:
  """Mapped ``(params, batch) -> [K, C, C]`` confusions of K weight pairs."""
  crf = config.eval.crf
  num_classes = config.data.num_classes
  mean, std = tuple(config.data.mean), tuple(config.data.std)

  def fn(params, batch, *, axis_name):
    def one(bi_w, pos_w):
      settings = {'num_iterations': crf.num_iterations,
                  'backend': crf.backend, 'bi_w': bi_w, 'pos_w': pos_w,
                  **{k: params[k] for k in BANDWIDTH_KEYS}}
      return step_lib.score_logits(
          batch['logits'], batch, axis_name=axis_name,
          num_classes=num_classes, crf=settings, mean=mean,
          std=std)['confusion']
    # The lattices depend on the bandwidths only, so vmap over the weights
    # builds them once and filters the K weight pairs' beliefs together.
    return jax.vmap(one)(params['bi_w'], params['pos_w'])

  return dp.map(fn, parallel.REPLICATED)


def _scores(cm, config) -> Dict[str, Any]:
  s = metrics_lib.segmentation_scores(cm, loop.class_names(config))
  return {'miou': s['miou'], 'pixel_accuracy': s['pixel_accuracy'],
          'per_class': s['per_class']}


def search(config: ml_collections.ConfigDict, workdir: str,
           grid: Optional[Dict[str, Sequence[float]]] = None, *,
           num_images: int = 100, step: Optional[int] = None,
           include_config_setting: bool = True,
           log: Callable[[str], None] = print) -> Dict[str, Any]:
  """Evaluates every CRF setting of ``grid`` on the first val images.

  Args:
    config: the run's config (model, data, ``eval.crf`` for the number of
      iterations, the backend and the setting evaluated beside the grid).
    workdir: the run directory (``checkpoints/`` inside).
    grid: lists of values for the keys of :data:`SETTING_KEYS` (missing keys
      take :data:`DEFAULT_GRID`'s).
    num_images: first images of ``config.data.eval_split`` to use (-1: all).
    step: checkpoint step (default: the latest).
    include_config_setting: also evaluate ``config.eval.crf``'s setting.
    log: where progress and the table go.

  Returns:
    A dict with ``no_crf`` (the network's scores), ``results`` (one dict per
    grid setting: the setting's values, ``miou``, ``pixel_accuracy``),
    ``best`` (the grid result with the highest mIoU, first on ties),
    ``config_setting`` (or None), ``num_images``, ``step``, ``backend``,
    ``num_iterations``, ``seconds``; also written to
    ``WORKDIR/crf_search_STEP.json``.
  """
  t0 = time.time()
  validate_config(config)
  grid = dict(grid or {})
  unknown = sorted(set(grid) - set(SETTING_KEYS))
  if unknown:
    raise ValueError(f'unknown CRF grid keys {unknown} (expected '
                     f'{list(SETTING_KEYS)})')
  grid = {k: tuple(float(v) for v in grid.get(k, DEFAULT_GRID[k]))
          for k in SETTING_KEYS}
  validate_grid(grid)
  records = voc.list_records(loop.dataset_root(config, workdir),
                             config.data.eval_split)
  if num_images >= 0:
    records = records[:num_images]
  dp = parallel.DataParallel(config.parallel)
  if config.data.eval_batch_size % dp.num_devices:
    raise ValueError(f'config.data.eval_batch_size='
                     f'{config.data.eval_batch_size} is not a multiple of the '
                     f'{dp.num_devices} devices')
  state = loop.restore_for_eval(config, workdir, step)
  step = int(state.step)
  batches = _cache_logits(config, dp, dp.put_state(state), records)
  del state
  log(f'CRF search on {len(records)} {config.data.eval_split} images, '
      f'checkpoint step {step}, {config.eval.crf.num_iterations} mean-field '
      f'iterations, {config.eval.crf.backend} backend')

  p_plain = dp.map(
      lambda _, b, axis_name: step_lib.score_logits(
          b['logits'], b, axis_name=axis_name,
          num_classes=config.data.num_classes)['confusion'],
      parallel.REPLICATED)
  dummy = dp.put_state(np.zeros((), np.float32))
  cm = sum(dp.fetch(p_plain(dummy, b)).astype(np.int64) for b in batches)
  no_crf = _scores(cm, config)
  log(f'without the CRF: mIoU {no_crf["miou"] * 100:.2f}')

  p_crf = _crf_confusions(config, dp)
  weights = list(itertools.product(grid['bi_w'], grid['pos_w']))

  def evaluate(bandwidths, weight_pairs):
    params = {k: np.float32(v) for k, v in bandwidths.items()}
    params['bi_w'] = np.asarray([w[0] for w in weight_pairs], np.float32)
    params['pos_w'] = np.asarray([w[1] for w in weight_pairs], np.float32)
    dparams = dp.put_state(params)
    cms = sum(dp.fetch(p_crf(dparams, b)).astype(np.int64) for b in batches)
    return [dict(zip(WEIGHT_KEYS, w), **bandwidths, **_scores(c, config))
            for w, c in zip(weight_pairs, cms)]

  results = []
  combos = list(itertools.product(*(grid[k] for k in BANDWIDTH_KEYS)))
  for i, combo in enumerate(combos):
    t1 = time.time()
    rows = evaluate(dict(zip(BANDWIDTH_KEYS, combo)), weights)
    results.extend(rows)
    best_here = max(rows, key=lambda r: r['miou'])
    log(f'[{i + 1}/{len(combos)}] '
        + ', '.join(f'{k}={v:g}' for k, v in zip(BANDWIDTH_KEYS, combo))
        + f': best mIoU {best_here["miou"] * 100:.2f} at bi_w='
        f'{best_here["bi_w"]:g}, pos_w={best_here["pos_w"]:g} '
        f'({time.time() - t1:.1f} s)')
  config_row = None
  if include_config_setting:
    crf = config.eval.crf
    config_row = evaluate({k: float(crf[k]) for k in BANDWIDTH_KEYS},
                          [(float(crf.bi_w), float(crf.pos_w))])[0]
  results.sort(key=lambda r: tuple(r[k] for k in SETTING_KEYS))
  best = max(results, key=lambda r: r['miou'])
  report = {
      'step': step, 'num_images': len(records),
      'eval_split': config.data.eval_split,
      'backend': config.eval.crf.backend,
      'num_iterations': int(config.eval.crf.num_iterations),
      'grid': {k: list(v) for k, v in grid.items()},
      'no_crf': no_crf, 'results': results, 'best': best,
      'config_setting': config_row, 'seconds': time.time() - t0,
  }
  log(format_report(report))
  if jax.process_index() == 0:
    path = os.path.join(workdir, f'crf_search_{step}.json')
    with open(path + '.tmp', 'w') as f:
      json.dump(report, f, indent=1, allow_nan=True)
    os.replace(path + '.tmp', path)
    log(f'wrote {path}')
  return report


def _setting(row) -> str:
  return ', '.join(f'{k}={row[k]:g}' for k in SETTING_KEYS)


def format_report(report: Dict[str, Any]) -> str:
  """The table of a :func:`search` report, the best setting last."""
  head = ''.join(f'{k:>11}' for k in SETTING_KEYS)
  lines = [f'{head}   mIoU  pix.acc']
  for r in report['results']:
    lines.append(''.join(f'{r[k]:>11g}' for k in SETTING_KEYS)
                 + f' {r["miou"] * 100:6.2f}  {r["pixel_accuracy"] * 100:6.2f}')
  no_crf = report['no_crf']
  lines.append(f'without the CRF: mIoU {no_crf["miou"] * 100:.2f}, pixel '
               f'accuracy {no_crf["pixel_accuracy"] * 100:.2f}')
  row = report.get('config_setting')
  if row:
    lines.append(f'config.eval.crf ({_setting(row)}): mIoU '
                 f'{row["miou"] * 100:.2f} ({(row["miou"] - no_crf["miou"]) * 100:+.2f})')
  best = report['best']
  lines.append(f'best ({_setting(best)}): mIoU {best["miou"] * 100:.2f} '
               f'({(best["miou"] - no_crf["miou"]) * 100:+.2f}) on '
               f'{report["num_images"]} images, {report["num_iterations"]} '
               f'iterations, {report["backend"]}')
  lines.append('select it with: ' + ' '.join(
      f'--config.eval.crf.{k}={best[k]:g}' for k in SETTING_KEYS))
  return '\n'.join(lines)


def _main(argv):
  from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if not f['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # library INFO chatter off
  grid = {k: parse_values(getattr(f, k)) for k in SETTING_KEYS}
  search(f.config, f.workdir, grid, num_images=f.num_images, step=f.step,
         include_config_setting=f.include_config_setting)


def _define_flags():
  """The command's flags (defined only when run, not on import)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None,
                                  'Recipe file (PATH[:VARIANT]).',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'The run directory (checkpoints/).')
  flags.DEFINE_integer('num_images', 100,
                       'First val images to use (DeepLab: 100); -1: all.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: latest).')
  flags.DEFINE_bool('include_config_setting', True,
                    "Also evaluate config.eval.crf's own setting.")
  for key in SETTING_KEYS:
    flags.DEFINE_string(
        key, ','.join(f'{v:g}' for v in DEFAULT_GRID[key]),
        f'Values of {key}: comma-separated and/or start:step:stop ranges.')
  flags.mark_flags_as_required(['config', 'workdir'])


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(_main)
