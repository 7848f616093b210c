"""Inference modes of a trained run: mIoU and time per image, same run.

  python bench/eval_modes.py --workdir=runs/demo
  python bench/eval_modes.py --workdir=runs/demo --modes=plain,flip,ms3_flip \\
      --json=eval_modes.json

Evaluates the latest checkpoint of ``--workdir`` (its saved ``config.json``)
on its eval split once per mode, through the trainer's own evaluator
(``flaxseg.train.evaluator``), and prints for each mode the mIoU, the pixel
accuracy, the change against ``plain`` and the wall time per image with the
compile excluded (the first pass compiles, the second is timed).

Modes: ``plain`` (single scale), ``flip``, ``ms3`` (scales 0.75, 1, 1.25),
``ms3_flip``, ``ms6_flip`` (DeepLab v3's 0.5-1.75 and flips), ``os16`` /
``os8`` (evaluation at that output stride), ``window`` (a sliding window of
2/3 of the eval canvas), ``crf`` (the dense CRF with ``config.eval.crf``).
"""

import argparse
import json
import time

import jax

from flaxseg.data import voc
from flaxseg.train import builders, evaluator, parallel

MODES = {
    'plain': {},
    'flip': {'flip': True},
    'ms3': {'scales': (0.75, 1.0, 1.25)},
    'ms3_flip': {'scales': (0.75, 1.0, 1.25), 'flip': True},
    'ms6_flip': {'scales': (0.5, 0.75, 1.0, 1.25, 1.5, 1.75), 'flip': True},
    'os16': {'output_stride': 16},
    'os8': {'output_stride': 8},
    'window': {'window': 'two_thirds'},
    'crf': {'crf': True},
}


def configure(config, mode):
  """A copy of ``config`` with ``mode``'s ``config.eval`` settings."""
  c = builders.config_from_dict(config.to_dict())
  for key, value in MODES[mode].items():
    if key == 'crf':
      c.eval.crf.enabled = True
    elif key == 'window':
      side = max(1, (2 * int(c.data.eval_pad_size)) // 3)
      c.eval.window = (side, side)
    else:
      c.eval[key] = value
  return c


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--modes', default='plain,flip,ms3,ms3_flip,os16,window')
  parser.add_argument('--num_images', type=int, default=-1,
                      help='first N eval images (-1: all)')
  parser.add_argument('--json', default='')
  args = parser.parse_args()
  modes = args.modes.split(',')
  unknown = sorted(set(modes) - set(MODES))
  if unknown:
    parser.error(f'unknown modes {unknown}; known: {sorted(MODES)}')

  base = builders.load_run_config(args.workdir)
  base.eval.num_images = args.num_images
  base.eval.num_visualize = 0
  records = voc.list_records(builders.dataset_root(base, args.workdir),
                             base.data.eval_split)
  if args.num_images >= 0:
    records = records[:args.num_images]
  state = evaluator.restore_for_eval(base, args.workdir)
  dp = parallel.DataParallel(base.parallel)
  dstate = dp.put_state(state)
  rows = []
  for mode in modes:
    config = configure(base, mode)
    p_eval = evaluator.map_eval_step(config, dp)
    t0 = time.perf_counter()
    evaluator.evaluate(config, dp, p_eval, dstate, records, step=0)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = evaluator.evaluate(config, dp, p_eval, dstate, records, step=0)
    timed = time.perf_counter() - t0
    rows.append({'mode': mode, 'settings': MODES[mode],
                 'miou': scores['miou'],
                 'pixel_accuracy': scores['pixel_accuracy'],
                 'seconds_per_image': timed / len(records),
                 'compile_seconds': max(first - timed, 0.0)})
  plain = next((r['miou'] for r in rows if r['mode'] == 'plain'), None)
  print(f'{args.workdir}: {len(records)} images, model '
        f'{base.model.name}, trained at output stride '
        f'{base.model.get("output_stride")}, {jax.device_count()} device(s)')
  print(f'{"mode":10s} {"mIoU":>7s} {"pix acc":>8s} {"vs plain":>9s} '
        f'{"ms/img":>8s} {"compile s":>9s}')
  for r in rows:
    delta = '' if plain is None else f'{100 * (r["miou"] - plain):+.2f}'
    print(f'{r["mode"]:10s} {100 * r["miou"]:7.2f} '
          f'{100 * r["pixel_accuracy"]:8.2f} {delta:>9s} '
          f'{1000 * r["seconds_per_image"]:8.1f} {r["compile_seconds"]:9.1f}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'workdir': args.workdir, 'num_images': len(records),
                 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  # Before JAX starts: keep XLA:CPU's buffers mapped (flaxseg/cpu_malloc.py).
  from flaxseg import cpu_malloc  # pylint: disable=g-import-not-at-top
  cpu_malloc.reexec_if_needed()
  main()
