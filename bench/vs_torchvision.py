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

``--dtype float32,bfloat16`` times each in both: flaxseg's model computing
in bfloat16 with float32 parameters, torch's forward under
``torch.autocast(dtype=torch.bfloat16)``.

By default (``--isolate process``) each framework runs in its own worker
process (``multiprocessing`` spawn), fresh for each row: the JAX worker is
built, compiled and warmed up, then the torch worker, and then the parent
asks each in turn for one timed run, so only one of them computes at a time.
Both share one process with ``--isolate none``, as sessions before 16 timed
them; there each framework's thread pool and allocations can slow the
other (BENCHMARKS.md, 2026-12-04: the R50 training step 13% slower than in
its own process, R101's unchanged). The process mode also reports each
worker's peak RSS (the torch worker never imports JAX) and, on an
accelerator, its peak device memory.

It prints the median seconds of ``--repeats`` runs, images/s of each, and the
ratio torch_time / jax_time (> 1: flaxseg is faster), plus the JAX compile
time of each function. ``--conv_impl xla,matmul`` times flaxseg's two
convolution implementations (``layers.MatmulConv``), each against torch;
``--scan_blocks`` builds flaxseg's models with ``scan_blocks=True`` (repeated
ResNet blocks as one ``jax.lax.scan``: less compile time, same parameters).
With ``--flops`` it also reports the FLOPs XLA counts in each JAX function
(`_flops`: the same count on every device), the FLOP/s achieved, and that as
a fraction of the device's peak, measured in the same run as the best of a
few jitted ``--peak_size`` square matmuls in each dtype. Both use
``--threads`` threads (torch ``set_num_threads``; XLA:CPU uses the process's
cores: run under ``taskset`` to pin both). On a GPU/TPU VM the same command
times the accelerator (torch on CUDA if available, with
``cudnn.benchmark`` unless ``--cudnn_benchmark 0``; the JAX worker then
preallocates at most 45% of the device memory unless
``XLA_PYTHON_CLIENT_MEM_FRACTION`` is set, leaving room for torch's). On the
CPU the process first re-executes itself with flaxseg's glibc malloc
settings, as ``train.py`` does (``flaxseg/cpu_malloc.py``); the workers
inherit its environment, so torch runs with them too. ``FLAXSEG_CPU_MALLOC=0`` times both with glibc's
defaults.
"""

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np

import memstats

# JAX is imported where it is used: the torch worker process (which imports
# this module) then holds torch alone, and its peak RSS is torch's.

TV = {'deeplabv3_resnet50_tv': 'deeplabv3_resnet50',
      'deeplabv3_resnet101_tv': 'deeplabv3_resnet101',
      'fcn_resnet50_tv': 'fcn_resnet50', 'fcn_resnet101_tv': 'fcn_resnet101'}


def _shape(text):
  b, s = text.lower().split('x')
  return int(b), int(s)


def jax_fns(name, size, lr=0.01, conv_impl='auto', dtype='float32',
            scan_blocks=False):
  """``(model, fresh train state, the step module)`` for flaxseg's ``name``.

  ``dtype`` is the computation dtype; parameters stay float32.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flaxseg import models  # pylint: disable=g-import-not-at-top
  from flaxseg.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from flaxseg.train import step as step_lib  # pylint: disable=g-import-not-at-top
  model = models.create_model(name, num_classes=21, conv_impl=conv_impl,
                              dtype=dtype, scan_blocks=scan_blocks)
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


def matmul_peak(n=4096, repeats=5, dtype='float32'):
  """FLOP/s of the best of ``repeats`` jitted ``n x n`` matmuls in ``dtype``.

  JAX's default precision: on a GPU that lets XLA use TF32 for float32, as
  it does for the model's float32 convolutions.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a))
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best


def _flops(jitted, *args):
  """XLA's FLOP count of ``jitted(*args)``, on its HLO lowered for the CPU.

  Counted before backend optimisation, so the count is the same program's
  on every device: on a GPU the compiled program's own ``cost_analysis``
  leaves out the convolutions XLA hands to cuDNN (it counted 34 of the
  DeepLab v3-R50 training step's 6,786 GFLOP at 8x513 on an H200), and a
  GPU's ``Lowered.cost_analysis`` is not implemented through the PJRT C
  API.
  """
  lowered = jitted.trace(*args).lower(lowering_platforms=('cpu',))
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get('flops', 0.0))


def _data(batch, size):
  """The same random images and labels for both frameworks (NHWC, int32)."""
  rng = np.random.default_rng(0)
  images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  labels = rng.integers(0, 21, (batch, size, size)).astype(np.int32)
  labels[:, :4] = 255
  return images, labels


def jax_runner(name, kind, batch, size, conv_impl='auto', dtype='float32',
               scan_blocks=False):
  """``(run, compile_s, count_flops)``: one timed JAX call for ``kind``.

  ``count_flops()`` returns XLA's FLOP count of the call (`_flops`).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  images, labels = _data(batch, size)
  model, state, step_lib = jax_fns(name, size, conv_impl=conv_impl,
                                   dtype=dtype, scan_blocks=scan_blocks)
  x_j, y_j = jnp.asarray(images), jnp.asarray(labels)
  holder = {'state': state}
  if kind == 'train':
    step = jax.jit(lambda s, b: step_lib.train_step(s, b, axis_name=None),
                   donate_argnums=0)
    batch_j = {'image': x_j, 'label': y_j}
    t0 = time.perf_counter()
    compiled = step.lower(holder['state'], batch_j).compile()
    compile_s = time.perf_counter() - t0
    count_flops = lambda: _flops(step, holder['state'], batch_j)

    def run():
      holder['state'], m = compiled(holder['state'], batch_j)
      # The whole updated state, as torch's synchronize waits for step().
      jax.block_until_ready((holder['state'], m))
  else:
    infer = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
    t0 = time.perf_counter()
    compiled = infer.lower(state.variables, x_j).compile()
    compile_s = time.perf_counter() - t0
    count_flops = lambda: _flops(infer, holder['state'].variables, x_j)

    def run():
      jax.block_until_ready(compiled(holder['state'].variables, x_j))
  return run, compile_s, count_flops


def torch_runner(name, kind, batch, size, device, tmodel=None,
                 dtype='float32'):
  """One timed torchvision call for ``kind`` (training step or inference).

  ``dtype='bfloat16'``: the forward pass (and so its backward) under
  ``torch.autocast`` to bfloat16, parameters float32, the usual mixed
  precision of a torch user.
  """
  import contextlib  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  images, labels = _data(batch, size)
  if dtype == 'float32':
    cast = contextlib.nullcontext
  else:
    cast = lambda: torch.autocast('cpu' if device == 'cpu' else 'cuda',
                                  dtype=getattr(torch, dtype))
  tmodel = tmodel if tmodel is not None else torch_model(name, device)
  x_t = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)
  y_t = torch.from_numpy(labels.astype(np.int64)).to(device)
  if kind == 'train':
    tmodel.train()
    opt = torch.optim.SGD(tmodel.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=255)

    def run():
      opt.zero_grad(set_to_none=True)
      with cast():
        loss = loss_fn(tmodel(x_t)['out'].float(), y_t)
      loss.backward()
      opt.step()
      if device != 'cpu':
        torch.cuda.synchronize()
  else:
    tmodel.eval()

    def run():
      with torch.inference_mode(), cast():
        tmodel(x_t)['out']
      if device != 'cpu':
        torch.cuda.synchronize()
  return run


def _median_alternating(fns, repeats):
  """Runs each fn ``repeats`` times, alternating; returns medians (s)."""
  times = [[] for _ in fns]
  for _ in range(repeats):
    for i, fn in enumerate(fns):
      t0 = time.perf_counter()
      fn()
      times[i].append(time.perf_counter() - t0)
  return [statistics.median(t) for t in times]


def _worker(conn, framework, job):
  """A worker process: builds one side of a row, then times it on request.

  Replies ``('ready', info)`` once built and warmed up (the compile/warm-up
  run excluded), then one ``('time', seconds)`` per ``'run'`` message, and
  ``('done', info)`` with its peak RSS (and, on an accelerator, its peak
  device memory) on ``'stop'``. An exception is sent back as ``('error',
  traceback)``.
  """
  import traceback  # pylint: disable=g-import-not-at-top
  try:
    info = {}
    if framework == 'probe':
      import jax  # pylint: disable=g-import-not-at-top
      info['platform'] = jax.devices()[0].platform
      if job.get('peak_size'):
        info['peak'] = {d: matmul_peak(job['peak_size'], dtype=d)
                        for d in job['dtypes']}
      run = lambda: None
    elif framework == 'jax':
      if job['device'] != 'cpu':
        # Both workers share the accelerator: JAX must not preallocate 75%.
        os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.45')
      run, info['compile_s'], count_flops = jax_runner(
          job['name'], job['kind'], job['batch'], job['size'],
          job['conv_impl'], job['dtype'], job['scan_blocks'])
      if job['flops']:
        info['flops'] = count_flops()
    else:
      import torch  # pylint: disable=g-import-not-at-top
      torch.set_num_threads(job['threads'])
      torch.backends.cudnn.benchmark = job['cudnn_benchmark']
      run = torch_runner(job['name'], job['kind'], job['batch'], job['size'],
                         job['device'], dtype=job['dtype'])
    run()                                    # warm-up, excluded
    conn.send(('ready', info))
    while True:
      msg = conn.recv()
      if msg == 'stop':
        device_mb = (memstats.torch_device_peak_mb() if framework == 'torch'
                     else memstats.jax_device_peak_mb())
        conn.send(('done', {'rss_mb': memstats.peak_rss_mb(),
                            'device_mb': device_mb}))
        return
      t0 = time.perf_counter()
      run()
      conn.send(('time', time.perf_counter() - t0))
  except BaseException:  # pylint: disable=broad-except
    conn.send(('error', traceback.format_exc()))


class _Worker:
  """The parent's handle on one `_worker` process."""

  def __init__(self, framework, job):
    import multiprocessing  # pylint: disable=g-import-not-at-top
    ctx = multiprocessing.get_context('spawn')
    self.framework = framework
    self.conn, child = ctx.Pipe()
    self.proc = ctx.Process(target=_worker, args=(child, framework, job),
                            daemon=True)
    self.proc.start()
    child.close()

  def expect(self, kind):
    try:
      tag, value = self.conn.recv()
    except EOFError:
      self.proc.join()
      raise RuntimeError(f'the {self.framework} worker died (exit code '
                         f'{self.proc.exitcode})') from None
    if tag == 'error':
      raise RuntimeError(f'the {self.framework} worker failed:\n{value}')
    assert tag == kind, (tag, kind)
    return value

  def __call__(self):
    self.conn.send('run')
    self.expect('time')

  def stop(self):
    self.conn.send('stop')
    info = self.expect('done')
    self.proc.join()
    return info

  def kill(self):
    if self.proc.is_alive():
      self.proc.kill()
      self.proc.join()


def _row_in_processes(job, repeats):
  """Times one row with each framework in its own process, alternating."""
  workers = []
  try:
    infos = {}
    # Built one after the other, so that neither's compile or warm-up runs
    # while the other is being timed or built.
    for framework in ('jax', 'torch'):
      workers.append(_Worker(framework, job))
      infos[framework] = workers[-1].expect('ready')
    jax_s, torch_s = _median_alternating(workers, repeats)
    rss = {w.framework: w.stop() for w in workers}
  finally:
    for w in workers:
      w.kill()
  return (jax_s, torch_s, infos['jax']['compile_s'],
          infos['jax'].get('flops'), rss)


def _row_in_process(job, repeats, tmodel):
  run_jax, compile_s, count_flops = jax_runner(
      job['name'], job['kind'], job['batch'], job['size'], job['conv_impl'],
      job['dtype'], job['scan_blocks'])
  run_torch = torch_runner(job['name'], job['kind'], job['batch'],
                           job['size'], job['device'], tmodel, job['dtype'])
  run_jax()
  run_torch()          # warm-up, excluded
  jax_s, torch_s = _median_alternating([run_jax, run_torch], repeats)
  flops = count_flops() if job['flops'] else None
  return jax_s, torch_s, compile_s, flops, None


def bench_model(name, train_shapes, infer_shapes, repeats, device,
                peak=None, conv_impl='auto', isolate='process', threads=1,
                dtype='float32', cudnn_benchmark=False, on_row=None,
                scan_blocks=False):
  """Times every shape of one model; returns the rows.

  ``peak``: the device's matmul FLOP/s in ``dtype`` (None: no FLOP report).
  ``on_row(row)`` is called as each row is done.
  """
  rows = []
  tmodel = torch_model(name, device) if isolate == 'none' else None
  for kind, shapes in (('train', train_shapes), ('infer', infer_shapes)):
    for batch, size in shapes:
      job = {'name': name, 'kind': kind, 'batch': batch, 'size': size,
             'conv_impl': conv_impl, 'device': device, 'threads': threads,
             'flops': bool(peak), 'dtype': dtype,
             'cudnn_benchmark': cudnn_benchmark, 'scan_blocks': scan_blocks}
      if isolate == 'process':
        jax_s, torch_s, compile_s, flops, rss = _row_in_processes(job,
                                                                  repeats)
      else:
        jax_s, torch_s, compile_s, flops, rss = _row_in_process(job, repeats,
                                                                tmodel)
      row = {'model': name, 'conv_impl': conv_impl, 'dtype': dtype,
             'scan_blocks': scan_blocks, 'kind': kind, 'batch': batch,
             'size': size, 'isolate': isolate,
             'jax_s': jax_s, 'torch_s': torch_s,
             'jax_img_s': batch / jax_s, 'torch_img_s': batch / torch_s,
             'ratio': torch_s / jax_s, 'jax_compile_s': compile_s}
      extra = ''
      if rss:
        row.update({'jax_peak_rss_mb': rss['jax']['rss_mb'],
                    'torch_peak_rss_mb': rss['torch']['rss_mb']})
        extra += (f'  RSS jax {rss["jax"]["rss_mb"]:6.0f} / torch '
                  f'{rss["torch"]["rss_mb"]:6.0f} MB')
        if rss['jax']['device_mb'] is not None:
          row.update({'jax_peak_device_mb': rss['jax']['device_mb'],
                      'torch_peak_device_mb': rss['torch']['device_mb']})
          extra += (f'  device jax {rss["jax"]["device_mb"]:6.0f} / torch '
                    f'{rss["torch"]["device_mb"]:6.0f} MB')
      if peak:
        row.update({'jax_gflop': flops / 1e9,
                    'jax_gflop_s': flops / jax_s / 1e9,
                    'torch_gflop_s_same_work': flops / torch_s / 1e9,
                    'fraction_of_peak': flops / jax_s / peak})
        extra += (f'  {flops / 1e9:6.1f} GFLOP, {flops / jax_s / 1e9:6.1f} '
                  f'GFLOP/s ({100 * flops / jax_s / peak:4.1f}% of peak)')
      rows.append(row)
      if on_row:
        on_row(row)
      print(f'{name:24s} {conv_impl:6s}{"+scan" if scan_blocks else ""} '
            f'{dtype:8s} {kind:5s} '
            f'{batch:2d}x{size:<4d} '
            f'jax {jax_s:7.3f} s ({batch / jax_s:6.2f} img/s)  '
            f'torch {torch_s:7.3f} s ({batch / torch_s:6.2f} img/s)  '
            f'ratio {torch_s / jax_s:5.2f}  compile {compile_s:5.1f} s'
            + extra, flush=True)
  return rows


DTYPES = ('float32', 'bfloat16')


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
  parser.add_argument('--dtype', default='float32',
                      help='computation dtypes to time, comma-separated: '
                      'float32, bfloat16 (flaxseg: the model\'s dtype, '
                      'float32 parameters; torch: autocast)')
  parser.add_argument('--scan_blocks', action='store_true',
                      help='flaxseg: scan over repeated ResNet blocks '
                      '(resnet.ResNet.scan_blocks)')
  parser.add_argument('--cudnn_benchmark', type=int, default=1,
                      help='torch on CUDA: torch.backends.cudnn.benchmark '
                      '(1, as mmsegmentation\'s configs set it; XLA '
                      'autotunes its convolutions too)')
  parser.add_argument('--isolate', default='process',
                      choices=('process', 'none'),
                      help='process: each framework in its own worker '
                      'process (built one after the other, then timed '
                      'alternately; also reports each one\'s peak RSS); '
                      'none: both in this process')
  parser.add_argument('--json', default='',
                      help='written after each row, so a run stopped '
                      'part-way keeps the rows it finished')
  args = parser.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  from flaxseg.models.layers import CONV_IMPLS  # pylint: disable=g-import-not-at-top
  impls = [i for i in args.conv_impl.split(',') if i]
  bad = sorted(set(impls) - set(CONV_IMPLS))
  if bad:
    parser.error(f'unknown --conv_impl {bad}')
  dtypes = [d for d in args.dtype.split(',') if d]
  bad = sorted(set(dtypes) - set(DTYPES))
  if bad or not dtypes:
    parser.error(f'unknown --dtype {bad}; known: {list(DTYPES)}')
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  cudnn_benchmark = bool(args.cudnn_benchmark) and device != 'cpu'
  names = [n for n in args.models.split(',') if n]
  unknown = sorted(set(names) - set(TV))
  if unknown:
    parser.error(f'unknown models {unknown}; known: {sorted(TV)}')
  train = [_shape(s) for s in args.train.split(',') if s]
  infer = [_shape(s) for s in args.infer.split(',') if s]
  peak_size = args.peak_size if args.flops else 0
  if args.isolate == 'process':
    # The parent starts no JAX backend (on a GPU it would hold the memory the
    # workers need): a probe process reads the platform and the peak.
    probe = _Worker('probe', {'peak_size': peak_size, 'device': device,
                              'dtypes': dtypes})
    try:
      info = probe.expect('ready')
      probe.stop()
    finally:
      probe.kill()
    jax_platform, peaks = info['platform'], info.get('peak') or {}
  else:
    jax_platform = jax.devices()[0].platform
    peaks = {d: matmul_peak(peak_size, dtype=d)
             for d in dtypes} if peak_size else {}
  print(f'jax {jax.__version__} on {jax_platform}, torch '
        f'{torch.__version__} / torchvision {torchvision.__version__} on '
        f'{device}, {args.threads} threads, {platform.processor() or "cpu"}, '
        f'median of {args.repeats}, '
        + ('each framework in its own process' if args.isolate == 'process'
           else 'both in one process'))
  if device != 'cpu':
    print(f'{torch.cuda.get_device_name()}: torch cudnn.benchmark '
          f'{cudnn_benchmark}, cudnn.allow_tf32 '
          f'{torch.backends.cudnn.allow_tf32}, matmul allow_tf32 '
          f'{torch.backends.cuda.matmul.allow_tf32}; jax default matmul '
          f'precision {jax.config.jax_default_matmul_precision}')
  from flaxseg import cpu_malloc  # pylint: disable=g-import-not-at-top
  # The workers inherit this process's environment: both frameworks run with
  # these settings.
  print(f'malloc: {cpu_malloc.describe()}')
  for d, peak in peaks.items():
    print(f'peak: {peak / 1e9:.1f} GFLOP/s (jitted {args.peak_size}^2 '
          f'{d} matmul)')
  rows = []

  def write():
    if args.json:
      with open(args.json, 'w') as f:
        json.dump({'jax': jax.__version__, 'torch': torch.__version__,
                   'device': (torch.cuda.get_device_name()
                              if device != 'cpu' else 'cpu'),
                   'threads': args.threads, 'repeats': args.repeats,
                   'isolate': args.isolate,
                   'cudnn_benchmark': cudnn_benchmark,
                   'malloc': cpu_malloc.describe(),
                   'peak_gflop_s': {d: p / 1e9 for d, p in peaks.items()}
                                   or None,
                   'rows': rows}, f, indent=1)
  def on_row(row):
    rows.append(row)
    write()

  for name in names:
    for impl in impls:
      for dtype in dtypes:
        bench_model(name, train, infer, args.repeats, device,
                    peaks.get(dtype), conv_impl=impl, isolate=args.isolate,
                    threads=args.threads, dtype=dtype,
                    cudnn_benchmark=cudnn_benchmark, on_row=on_row,
                    scan_blocks=args.scan_blocks)
  write()


if __name__ == '__main__':
  # Before JAX starts: keep XLA:CPU's buffers mapped (flaxseg/cpu_malloc.py).
  from flaxseg import cpu_malloc  # pylint: disable=g-import-not-at-top
  cpu_malloc.reexec_if_needed()
  main()
