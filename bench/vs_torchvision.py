"""Training step and inference of flaxseg's _tv models against torchvision's.

  python bench/vs_torchvision.py                       # R50 and R101, CPU
  python bench/vs_torchvision.py --models deeplabv3_resnet50_tv --repeats 5 \\
      --train 4x321 --infer 1x513,8x321 --json vs_tv.json

For each model it builds flaxseg's ``deeplabv3_resnet{50,101}_tv`` and
torchvision's ``deeplabv3_resnet{50,101}`` (random weights, 21 classes, no
aux head: the same 39,638,869 / 58,630,997 parameters), then times, with
runs of the two frameworks alternating and the first (compile / warm-up) run
excluded:

* ``train``: one training step, float32: forward in training mode
  (BatchNorm batch statistics), cross-entropy with 255 ignored, backward,
  SGD momentum 0.9 update (JAX: the trainer's ``train_step`` under ``jit``
  with the state donated; torch: ``zero_grad``/``backward``/``step``);
* ``infer``: inference-mode logits at input resolution (torch under
  ``inference_mode``).

It prints the median seconds of ``--repeats`` runs, images/s of each, and the
ratio torch_time / jax_time (> 1: flaxseg is faster), plus the JAX compile
time of each function. ``--conv_impl xla,matmul`` times flaxseg's two
convolution implementations (``layers.MatmulConv``), each against torch. With ``--flops`` it also reports the FLOPs XLA counts
in each compiled JAX function (``cost_analysis``), the FLOP/s achieved, and
that as a fraction of the device's peak, measured in the same run as the
best of a few jitted 4096x4096 float32 matmuls. Both use ``--threads`` threads (torch
``set_num_threads``; XLA:CPU uses the process's cores: run under
``taskset`` to pin both). On a GPU/TPU VM the same command times the
accelerator (torch on CUDA if available). On the CPU the process first
re-executes itself with flaxseg's glibc malloc settings, as ``train.py``
does (``flaxseg/cpu_malloc.py``); torch, in the same process, runs with them
too. ``FLAXSEG_CPU_MALLOC=0`` times both with glibc's defaults.
"""

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxseg.models.layers import CONV_IMPLS

TV = {'deeplabv3_resnet50_tv': 'deeplabv3_resnet50',
      'deeplabv3_resnet101_tv': 'deeplabv3_resnet101',
      'fcn_resnet50_tv': 'fcn_resnet50', 'fcn_resnet101_tv': 'fcn_resnet101'}


def _shape(text):
  b, s = text.lower().split('x')
  return int(b), int(s)


def jax_fns(name, size, lr=0.01, conv_impl='auto'):
  """``(model, fresh train state, the step module)`` for flaxseg's ``name``."""
  from flaxseg import models  # pylint: disable=g-import-not-at-top
  from flaxseg.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from flaxseg.train import step as step_lib  # pylint: disable=g-import-not-at-top
  model = models.create_model(name, num_classes=21, conv_impl=conv_impl)
  state = state_lib.create_train_state(model, optax.sgd(lr, 0.9),
                                       jax.random.key(0), (1, size, size, 3))
  return model, state, step_lib


def torch_model(name, device):
  import torch  # pylint: disable=g-import-not-at-top
  from torchvision.models import segmentation  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = getattr(segmentation, TV[name])(weights=None, weights_backbone=None,
                                          num_classes=21, aux_loss=False)
  return model.to(device)


def matmul_peak(n=4096, repeats=5):
  """FLOP/s of the best of ``repeats`` jitted ``n x n`` float32 matmuls."""
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a))
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best


def _flops(compiled):
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get('flops', 0.0))


def _median_alternating(fns, repeats):
  """Runs each fn ``repeats`` times, alternating; returns medians (s)."""
  times = [[] for _ in fns]
  for _ in range(repeats):
    for i, fn in enumerate(fns):
      t0 = time.perf_counter()
      fn()
      times[i].append(time.perf_counter() - t0)
  return [statistics.median(t) for t in times]


def bench_model(name, train_shapes, infer_shapes, repeats, device,
                peak=None, conv_impl='auto'):
  import torch  # pylint: disable=g-import-not-at-top
  rows = []
  rng = np.random.default_rng(0)
  tmodel = torch_model(name, device)
  for kind, shapes in (('train', train_shapes), ('infer', infer_shapes)):
    for batch, size in shapes:
      images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
      labels = rng.integers(0, 21, (batch, size, size)).astype(np.int32)
      labels[:, :4] = 255
      model, state, step_lib = jax_fns(name, size, conv_impl=conv_impl)
      x_t = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)
      y_t = torch.from_numpy(labels.astype(np.int64)).to(device)
      x_j, y_j = jnp.asarray(images), jnp.asarray(labels)
      holder = {'state': state}
      if kind == 'train':
        step = jax.jit(lambda s, b: step_lib.train_step(s, b, axis_name=None),
                       donate_argnums=0)
        batch_j = {'image': x_j, 'label': y_j}
        t0 = time.perf_counter()
        compiled = step.lower(holder['state'], batch_j).compile()
        compile_s = time.perf_counter() - t0

        def run_jax():
          holder['state'], m = compiled(holder['state'], batch_j)
          jax.block_until_ready(m['loss'])

        tmodel.train()
        opt = torch.optim.SGD(tmodel.parameters(), lr=0.01, momentum=0.9)
        loss_fn = torch.nn.CrossEntropyLoss(ignore_index=255)

        def run_torch():
          opt.zero_grad(set_to_none=True)
          loss = loss_fn(tmodel(x_t)['out'], y_t)
          loss.backward()
          opt.step()
          if device != 'cpu':
            torch.cuda.synchronize()
      else:
        infer = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
        t0 = time.perf_counter()
        compiled = infer.lower(state.variables, x_j).compile()
        compile_s = time.perf_counter() - t0

        def run_jax():
          jax.block_until_ready(compiled(holder['state'].variables, x_j))

        tmodel.eval()

        def run_torch():
          with torch.inference_mode():
            tmodel(x_t)['out']
          if device != 'cpu':
            torch.cuda.synchronize()
      run_jax()
      run_torch()          # warm-up, excluded
      jax_s, torch_s = _median_alternating([run_jax, run_torch], repeats)
      row = {'model': name, 'conv_impl': conv_impl, 'kind': kind,
             'batch': batch, 'size': size,
             'jax_s': jax_s, 'torch_s': torch_s,
             'jax_img_s': batch / jax_s, 'torch_img_s': batch / torch_s,
             'ratio': torch_s / jax_s, 'jax_compile_s': compile_s}
      extra = ''
      if peak:
        flops = _flops(compiled)
        row.update({'jax_gflop': flops / 1e9,
                    'jax_gflop_s': flops / jax_s / 1e9,
                    'torch_gflop_s_same_work': flops / torch_s / 1e9,
                    'fraction_of_peak': flops / jax_s / peak})
        extra = (f'  {flops / 1e9:6.1f} GFLOP, {flops / jax_s / 1e9:6.1f} '
                 f'GFLOP/s ({100 * flops / jax_s / peak:4.1f}% of peak)')
      rows.append(row)
      print(f'{name:24s} {conv_impl:6s} {kind:5s} {batch:2d}x{size:<4d} '
            f'jax {jax_s:7.3f} s ({batch / jax_s:6.2f} img/s)  '
            f'torch {torch_s:7.3f} s ({batch / torch_s:6.2f} img/s)  '
            f'ratio {torch_s / jax_s:5.2f}  compile {compile_s:5.1f} s'
            + extra, flush=True)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models',
                      default='deeplabv3_resnet50_tv,deeplabv3_resnet101_tv',
                      help=f'comma-separated; known: {sorted(TV)}')
  parser.add_argument('--train', default='4x321',
                      help='training shapes BATCHxSIZE, comma-separated '
                      '("" for none)')
  parser.add_argument('--infer', default='1x513,8x321',
                      help='inference shapes BATCHxSIZE ("" for none)')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--threads', type=int, default=os.cpu_count())
  parser.add_argument('--flops', action='store_true',
                      help='report FLOP/s and the fraction of matmul peak')
  parser.add_argument('--peak_size', type=int, default=4096,
                      help='matmul size for the peak measurement')
  parser.add_argument('--conv_impl', default='auto',
                      help="flaxseg convolution implementations to time, "
                      "comma-separated: auto (matmul on CPU, XLA's "
                      "elsewhere), xla, matmul, taps (layers.CONV_IMPLS)")
  parser.add_argument('--json', default='')
  args = parser.parse_args()
  impls = [i for i in args.conv_impl.split(',') if i]
  bad = sorted(set(impls) - set(CONV_IMPLS))
  if bad:
    parser.error(f'unknown --conv_impl {bad}')
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  names = [n for n in args.models.split(',') if n]
  unknown = sorted(set(names) - set(TV))
  if unknown:
    parser.error(f'unknown models {unknown}; known: {sorted(TV)}')
  train = [_shape(s) for s in args.train.split(',') if s]
  infer = [_shape(s) for s in args.infer.split(',') if s]
  print(f'jax {jax.__version__} on {jax.devices()[0].platform}, torch '
        f'{torch.__version__} / torchvision {torchvision.__version__} on '
        f'{device}, {args.threads} threads, {platform.processor() or "cpu"}, '
        f'median of {args.repeats}')
  from flaxseg import cpu_malloc  # pylint: disable=g-import-not-at-top
  # One process, so both frameworks run with these settings.
  print(f'malloc: {cpu_malloc.describe()}')
  peak = None
  if args.flops:
    peak = matmul_peak(args.peak_size)
    print(f'peak: {peak / 1e9:.1f} GFLOP/s (jitted {args.peak_size}^2 '
          'float32 matmul)')
  rows = []
  for name in names:
    for impl in impls:
      rows += bench_model(name, train, infer, args.repeats, device, peak,
                          conv_impl=impl)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'jax': jax.__version__, 'torch': torch.__version__,
                 'threads': args.threads, 'repeats': args.repeats,
                 'malloc': cpu_malloc.describe(),
                 'peak_gflop_s': None if peak is None else peak / 1e9,
                 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  # Before JAX starts: keep XLA:CPU's buffers mapped (flaxseg/cpu_malloc.py).
  from flaxseg import cpu_malloc  # pylint: disable=g-import-not-at-top
  cpu_malloc.reexec_if_needed()
  main()
