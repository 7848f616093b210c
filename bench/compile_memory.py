"""Compile time and memory of the training step, per registered model.

  python bench/compile_memory.py                           # every model
  python bench/compile_memory.py --models deeplabv3_resnet101 --batch 4 \\
      --crop 321 --remat both --rss --json compile.json
  python bench/compile_memory.py --models deeplabv3_resnet101_tv \\
      --scan_blocks both                                  # scanned blocks

For each model (21 classes, ``--dtype`` compute, SGD momentum) it lowers and
compiles the jitted training step (``flaxseg.train.step.train_step``, state
donated) at ``--batch`` x ``--crop`` and prints the seconds of tracing +
lowering and of XLA compilation, and XLA's memory analysis of the compiled
step (arguments, outputs and temporaries: the buffers the step needs at its
peak). With ``--remat both`` each model that takes ``remat`` is measured
without and with rematerialisation of its residual blocks, and with
``--scan_blocks both`` each model that takes ``scan_blocks`` without and with
its repeated ResNet blocks scanned (`flaxseg.models.resnet.ResNet`);
``--conv_impl xla`` builds the models that take ``conv_impl`` with XLA's
convolutions instead of their default (``auto``: per-tap matmuls on CPU). With
``--rss`` each case is measured in a fresh subprocess instead, which also
runs the step once and reports the process's peak resident set size
(``VmHWM``, `memstats.peak_rss_mb`, compile included; on GPU/TPU the
device's ``peak_bytes_in_use`` instead; the script turns JAX's preallocation
off, ``XLA_PYTHON_CLIENT_PREALLOCATE=false``, so that the parent's pool does
not leave the subprocess a quarter of the device). Each step is compiled
once either way.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import memstats


def build(name, batch, crop, remat, conv_impl=None, dtype='float32',
          scan_blocks=False):
  from flaxseg import models  # pylint: disable=g-import-not-at-top
  from flaxseg.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from flaxseg.train import step as step_lib  # pylint: disable=g-import-not-at-top
  kwargs = {'remat': True} if remat else {}
  if scan_blocks:
    kwargs['scan_blocks'] = True
  if dtype != 'float32':
    kwargs['dtype'] = dtype
  if conv_impl is not None:
    kwargs['conv_impl'] = conv_impl
  model = models.create_model(name, num_classes=21, **kwargs)
  state = state_lib.create_train_state(model, optax.sgd(0.01, 0.9),
                                       jax.random.key(0), (1, crop, crop, 3))
  rng = np.random.default_rng(0)
  data = {'image': jnp.asarray(rng.normal(size=(batch, crop, crop, 3)),
                               jnp.float32),
          'label': jnp.asarray(rng.integers(0, 21, (batch, crop, crop)),
                               jnp.int32)}
  step = jax.jit(lambda s, b: step_lib.train_step(s, b, axis_name=None),
                 donate_argnums=0)
  return state, data, step


def measure(name, batch, crop, remat, dtype='float32', scan_blocks=False,
            conv_impl=None):
  """Compile times and XLA memory of one case (in this process)."""
  state, data, step = build(name, batch, crop, remat, conv_impl=conv_impl,
                            dtype=dtype, scan_blocks=scan_blocks)
  t0 = time.perf_counter()
  lowered = step.lower(state, data)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  row = {'model': name, 'remat': remat, 'scan_blocks': scan_blocks,
         'conv_impl': conv_impl, 'dtype': dtype, 'batch': batch,
         'crop': crop, 'lower_s': t1 - t0, 'compile_s': t2 - t1}
  mem = compiled.memory_analysis()
  if mem is not None:
    row.update({
        'argument_mb': mem.argument_size_in_bytes / 2**20,
        'output_mb': mem.output_size_in_bytes / 2**20,
        'temp_mb': mem.temp_size_in_bytes / 2**20,
        'alias_mb': mem.alias_size_in_bytes / 2**20})
  return row, (state, data, compiled)


def child(args):
  """Measures one case in this (fresh) process and runs its step once;
  prints the row with the process's peak memory as JSON."""
  row, (state, data, compiled) = measure(args.models, args.batch, args.crop,
                                         args.child_remat, args.dtype,
                                         bool(args.child_scan),
                                         args.conv_impl or None)
  state, metrics = compiled(state, data)
  jax.block_until_ready(metrics['loss'])
  peak = memstats.jax_device_peak_mb()
  if peak is None:
    peak = memstats.peak_rss_mb()
  row.update({'peak_mb': peak, 'platform': jax.devices()[0].platform})
  print(json.dumps(row))


def main():
  # Compile time is what is measured here: a persistent compilation cache
  # (JAX_COMPILATION_CACHE_DIR) would turn it into the time to load a cached
  # executable.
  jax.config.update('jax_enable_compilation_cache', False)
  # Before any backend starts (inherited by the --rss subprocesses): on an
  # accelerator each process takes only what it uses.
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  from flaxseg.models.layers import CONV_IMPLS  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='',
                      help='comma-separated (default: every registered model)')
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--crop', type=int, default=321)
  parser.add_argument('--remat', choices=('off', 'on', 'both'), default='off')
  parser.add_argument('--scan_blocks', choices=('off', 'on', 'both'),
                      default='off',
                      help='scan over repeated ResNet blocks (models that '
                      'take scan_blocks)')
  parser.add_argument('--conv_impl', default='',
                      choices=('',) + CONV_IMPLS,
                      help='convolution implementation of the models that '
                      'take conv_impl (layers.CONV_IMPLS; default: the '
                      'model\'s own, auto)')
  parser.add_argument('--dtype', default='float32',
                      choices=('float32', 'bfloat16'),
                      help='computation dtype (parameters stay float32)')
  parser.add_argument('--rss', action='store_true',
                      help='also run each case in a subprocess for its peak '
                      'memory')
  parser.add_argument('--json', default='')
  parser.add_argument('--child_remat', type=int, default=-1,
                      help=argparse.SUPPRESS)
  parser.add_argument('--child_scan', type=int, default=0,
                      help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child_remat >= 0:
    args.child_remat = bool(args.child_remat)
    child(args)
    return
  from flaxseg import models  # pylint: disable=g-import-not-at-top
  names = [n for n in args.models.split(',') if n] or models.list_models()
  unknown = sorted(set(names) - set(models.list_models()))
  if unknown:
    parser.error(f'unknown models {unknown}')
  rows = []
  print(f'jax {jax.__version__} on {jax.devices()[0].platform}, batch '
        f'{args.batch}, crop {args.crop}, {args.dtype}, conv_impl '
        f'{args.conv_impl or "(model default)"}')
  print(f'{"model":26s} {"remat":5s} {"scan":5s} {"lower s":>8s} '
        f'{"compile s":>9s} '
        f'{"args MB":>8s} {"temp MB":>8s} {"peak MB":>8s}')
  choices = {'off': [False], 'on': [True], 'both': [False, True]}
  for name in names:
    accepted = models.accepted_kwargs(name)
    cases = [(remat, scan) for remat in choices[args.remat]
             for scan in choices[args.scan_blocks]
             if (not remat or 'remat' in accepted)
             and (not scan or 'scan_blocks' in accepted)]
    impl = (args.conv_impl or None) if 'conv_impl' in accepted else None
    for remat, scan in cases:
      if args.rss:
        # The whole case in the fresh process (its peak counts the compile,
        # as a training run's does): each step compiled once, not twice.
        done = subprocess.run(
            [sys.executable, os.path.abspath(__file__), f'--models={name}',
             f'--batch={args.batch}', f'--crop={args.crop}',
             f'--dtype={args.dtype}', f'--child_remat={int(remat)}',
             f'--child_scan={int(scan)}', f'--conv_impl={impl or ""}'],
            capture_output=True, text=True, check=False)
        if done.returncode:
          sys.exit(f'compile_memory: the case {name} remat={remat} '
                   f'scan_blocks={scan} failed (exit {done.returncode}):\n'
                   f'{done.stderr[-3000:]}')
        row = json.loads(done.stdout.strip().splitlines()[-1])
      else:
        row, _ = measure(name, args.batch, args.crop, remat, args.dtype,
                         scan, impl)
      rows.append(row)
      peak = row.get('peak_mb')
      print(f'{name:26s} {str(remat):5s} {str(scan):5s} '
            f'{row["lower_s"]:8.1f} '
            f'{row["compile_s"]:9.1f} {row.get("argument_mb", 0):8.0f} '
            f'{row.get("temp_mb", 0):8.0f} '
            f'{"" if peak is None else f"{peak:8.0f}"}', flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'jax': jax.__version__, 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  # Before JAX starts: keep XLA:CPU's buffers mapped (flaxseg/cpu_malloc.py).
  from flaxseg import cpu_malloc  # pylint: disable=g-import-not-at-top
  cpu_malloc.reexec_if_needed()
  main()
