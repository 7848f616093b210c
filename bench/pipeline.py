"""Input-pipeline throughput against what the training step consumes.

  python bench/pipeline.py                       # VOC-sized images, 513 crops
  python bench/pipeline.py --root /data/VOCdevkit/VOC2012 --split train
  python bench/pipeline.py --model deeplabv3_resnet101 --step_batch 2

Reads ``--root`` (default: a generated VOC-format set of ``--num_images``
images of 375-500 px, the size of PASCAL VOC's) through the trainer's
``pipeline.train_dataset`` (decode, random scale 0.5-2.0, pad, crop, flip,
normalise; tf.data with AUTOTUNE parallelism) at the recipe's global batch
and crop, and reports decoded, augmented examples per second after
``--warmup`` batches. With ``--model`` it also times that model's jitted
training step (float32, SGD) at ``--step_batch`` x crop (compile excluded,
median of ``--repeats``) and prints the pipeline's margin: pipeline
examples/s divided by the step's examples/s (>= 2 is the target).
"""

import argparse
import json
import os
import statistics
import tempfile
import time


def pipeline_rate(records, batch, crop, batches, warmup, num_classes=21):
  from flaxseg.data import pipeline  # pylint: disable=g-import-not-at-top
  ds = pipeline.train_dataset(records, num_classes=num_classes,
                              global_batch_size=batch, crop_size=(crop, crop),
                              seed=0)
  it = ds.as_numpy_iterator()
  for _ in range(warmup):
    next(it)
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * batch / (time.perf_counter() - t0)


def step_rate(model_name, batch, crop, repeats):
  import jax  # pylint: disable=g-import-not-at-top
  # The training-step setup of the sibling script (bench/ is on sys.path).
  from compile_memory import build  # pylint: disable=g-import-not-at-top
  state, data, step = build(model_name, batch, crop, remat=False)
  step = step.lower(state, data).compile()
  state, m = step(state, data)
  jax.block_until_ready(m['loss'])
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    state, m = step(state, data)
    jax.block_until_ready(m['loss'])
    times.append(time.perf_counter() - t0)
  return batch / statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--root', default='', help='VOCdevkit/VOC2012 (default: '
                      'a generated set)')
  parser.add_argument('--split', default='train')
  parser.add_argument('--num_images', type=int, default=64)
  parser.add_argument('--min_size', type=int, default=375)
  parser.add_argument('--max_size', type=int, default=500)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--crop', type=int, default=513)
  parser.add_argument('--batches', type=int, default=8)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--model', default='')
  parser.add_argument('--step_batch', type=int, default=2)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--json', default='')
  args = parser.parse_args()
  from flaxseg.data import synthetic, voc  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    root = args.root
    if not root:
      root = synthetic.generate_voc_tree(
          os.path.join(tmp, 'voc'), num_train=args.num_images, num_val=1,
          image_size=(args.min_size, args.max_size))
    records = voc.list_records(root, args.split)
    rate = pipeline_rate(records, args.batch, args.crop, args.batches,
                         args.warmup)
  result = {'pipeline_examples_per_s': rate, 'batch': args.batch,
            'crop': args.crop, 'cpus': os.cpu_count(),
            'root': args.root or f'generated {args.min_size}-{args.max_size} px'}
  print(f'pipeline: {rate:.1f} examples/s (batch {args.batch}, crop '
        f'{args.crop}, {result["root"]}, {os.cpu_count()} CPUs)')
  if args.model:
    consumed = step_rate(args.model, args.step_batch, args.crop, args.repeats)
    result.update({'model': args.model, 'step_batch': args.step_batch,
                   'step_examples_per_s': consumed,
                   'margin': rate / consumed})
    print(f'{args.model} training step: {consumed:.2f} examples/s at batch '
          f'{args.step_batch}; pipeline margin {rate / consumed:.1f}x '
          '(target >= 2)')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  # Before JAX starts: keep XLA:CPU's buffers mapped (flaxseg/cpu_malloc.py).
  from flaxseg import cpu_malloc  # pylint: disable=g-import-not-at-top
  cpu_malloc.reexec_if_needed()
  main()
