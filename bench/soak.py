"""Soak test: a long tiny training run, killed and restarted again and again.

  python bench/soak.py                        # 2000 steps, 8 kills
  python bench/soak.py --steps 5000 --kills 20 --signals KILL
  python bench/soak.py --config configs/deeplabv3.py:tiny --out soak.json

Runs ``train.py`` twice on the same config and data, one step after another:

1. uninterrupted for ``--steps`` steps, sampling the process's resident
   memory (``/proc/PID/status`` VmRSS) every ``--sample_s`` seconds;
2. the same run in a fresh workdir, killed ``--kills`` times just after it
   logs randomly drawn steps (signals cycling through ``--signals``: SIGKILL
   loses at most the steps since the last checkpoint, SIGTERM none) and
   restarted each time until it completes.

It reports, per kill, the last step logged before the kill, the step the
restart resumed from and the steps lost (logged - resumed, or 0 when the
restart resumed past the last logged step: at least this many were redone); whether the final parameters and BatchNorm statistics of
the two runs are bit-identical; and the uninterrupted run's memory while
it trains (RSS when 10%, 50%, 90% and 100% of the steps were logged, and the
growth from 10% and from 50% to the end). Prints a table; ``--out`` writes the figures as JSON.

With asynchronous checkpoints (the trainer's default) a SIGKILL that lands
while the newest checkpoint is still being written falls back to the one
before it, so a kill can lose up to the checkpoint interval plus the steps
that ran during that write; ``--async_save 0`` bounds the loss by the
interval.
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_mb(pid):
  try:
    with open(f'/proc/{pid}/status') as f:
      for line in f:
        if line.startswith('VmRSS:'):
          return int(line.split()[1]) / 1024.0
  except OSError:
    return None
  return None


class _Sampler(threading.Thread):
  """Samples a process's RSS until it exits."""

  def __init__(self, proc, every):
    super().__init__(daemon=True)
    self.proc, self.every, self.samples = proc, every, []

  def run(self):
    while self.proc.poll() is None:
      rss = _rss_mb(self.proc.pid)
      if rss is not None:
        self.samples.append((time.perf_counter(), rss))
      time.sleep(self.every)


def _launch(args, workdir, data_root):
  cmd = [sys.executable, os.path.join(ROOT, 'train.py'),
         f'--config={args.config}', f'--workdir={workdir}',
         f'--config.data.root={data_root}',
         f'--config.train.num_steps={args.steps}',
         f'--config.train.log_every_steps={args.log_every}',
         f'--config.checkpoint.every_steps={args.checkpoint_every}',
         '--config.checkpoint.max_to_keep=2',
         f'--config.checkpoint.async_save={bool(args.async_save)}']
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, PYTHONUNBUFFERED='1'))


_STEP = re.compile(r'^step (\d+)/')
_RESUMED = re.compile(r'^resumed from .* at step (\d+)')


def _follow(proc, until_step=None, times=None):
  """Reads output; returns (last logged step, resumed step, text).

  ``times``, if given, gets ``(perf_counter, step)`` for each logged step.
  """
  last, resumed, lines = 0, 0, []
  for line in proc.stdout:
    lines.append(line)
    m = _STEP.match(line)
    if m:
      last = int(m.group(1))
      if times is not None:
        times.append((time.perf_counter(), last))
      if until_step is not None and last >= until_step:
        break
    m = _RESUMED.match(line)
    if m:
      resumed = int(m.group(1))
  return last, resumed, ''.join(lines)


def _variables(workdir):
  from flaxseg.checkpoint import load_variables  # pylint: disable=g-import-not-at-top
  variables, meta = load_variables(workdir)
  return variables, meta


def _identical(a, b):
  import jax  # pylint: disable=g-import-not-at-top
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  if jax.tree.structure(a) != jax.tree.structure(b):
    return False, float('inf')
  worst = max((float(np.max(np.abs(np.asarray(x, np.float64) - y)))
               for x, y in zip(la, lb)), default=0.0)
  return all(np.array_equal(x, y) for x, y in zip(la, lb)), worst


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default=os.path.join(
      ROOT, 'configs', 'deeplabv3.py') + ':tiny', help='train.py --config')
  parser.add_argument('--steps', type=int, default=2000)
  parser.add_argument('--kills', type=int, default=8)
  parser.add_argument('--signals', default='KILL,TERM',
                      help='comma-separated, cycled over the kills')
  parser.add_argument('--checkpoint_every', type=int, default=100)
  parser.add_argument('--log_every', type=int, default=10)
  parser.add_argument('--async_save', type=int, default=1,
                      help='1: asynchronous checkpoints (the default of '
                      'config.checkpoint.async_save), 0: synchronous')
  parser.add_argument('--sample_s', type=float, default=0.5)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--workdir', default='', help='default: a temp dir')
  parser.add_argument('--out', default='', help='JSON output path')
  args = parser.parse_args()
  sigs = [getattr(signal, 'SIG' + s.strip().upper())
          for s in args.signals.split(',')]
  if args.kills >= args.steps // args.log_every:
    parser.error('--kills must be fewer than the logged steps')
  base = args.workdir or tempfile.mkdtemp(prefix='flaxseg_soak_')
  data_root = os.path.join(base, 'data')

  # 1. Uninterrupted, with memory samples.
  t0 = time.perf_counter()
  proc = _launch(args, os.path.join(base, 'whole'), data_root)
  sampler = _Sampler(proc, args.sample_s)
  sampler.start()
  step_times = []
  _, _, text = _follow(proc, times=step_times)
  proc.wait()
  sampler.join()
  whole_s = time.perf_counter() - t0
  if proc.returncode != 0:
    sys.exit(f'uninterrupted run failed:\n{text[-3000:]}')

  # 2. Killed at random logged steps, restarted until complete.
  rng = np.random.default_rng(args.seed)
  logged = np.arange(args.log_every, args.steps, args.log_every)
  targets = sorted(int(s) for s in rng.choice(logged, args.kills,
                                              replace=False))
  workdir = os.path.join(base, 'killed')
  kills = []
  t0 = time.perf_counter()
  for i, target in enumerate(targets):
    sig = sigs[i % len(sigs)]
    proc = _launch(args, workdir, data_root)
    last, resumed, text = _follow(proc, until_step=target)
    if kills:
      kills[-1]['resumed_at'] = resumed
      kills[-1]['steps_lost'] = max(0, kills[-1]['last_logged'] - resumed)
    if last < target:   # the run ended (or failed) before the target step
      proc.wait()
      sys.exit(f'run ended before step {target}:\n{text[-3000:]}')
    proc.send_signal(sig)
    proc.communicate()
    kills.append({'signal': signal.Signals(sig).name, 'last_logged': last,
                  'returncode': proc.returncode})
  proc = _launch(args, workdir, data_root)
  _, resumed, text = _follow(proc)
  proc.wait()
  killed_s = time.perf_counter() - t0
  if proc.returncode != 0:
    sys.exit(f'final restart failed:\n{text[-3000:]}')
  kills[-1]['resumed_at'] = resumed
  kills[-1]['steps_lost'] = max(0, kills[-1]['last_logged'] - resumed)

  whole, meta_w = _variables(os.path.join(base, 'whole'))
  killed, meta_k = _variables(workdir)
  same, worst = _identical(whole, killed)

  # Memory while training: RSS when 10%, 50%, 90% and all of the steps had
  # been logged (start-up, compilation and the final eval left out).
  samples, memory = sampler.samples, {}
  if samples and step_times:
    def rss_at(fraction):
      t = next(t for t, k in step_times if k >= fraction * args.steps)
      return round(min(samples, key=lambda s: abs(s[0] - t))[1], 1)
    for q in (0.1, 0.5, 0.9, 1.0):
      memory[f'rss_mb_at_step_{int(q * args.steps)}'] = rss_at(q)
    memory['rss_mb_peak'] = round(max(r for _, r in samples), 1)
    memory['growth_mb_10pct_to_end'] = round(rss_at(1.0) - rss_at(0.1), 1)
    memory['growth_mb_50pct_to_end'] = round(rss_at(1.0) - rss_at(0.5), 1)
    train_s = step_times[-1][0] - step_times[0][0]
    steps = step_times[-1][1] - step_times[0][1]
    memory['steps_per_s'] = round(steps / max(train_s, 1e-9), 1)
  lost = {}
  for k in kills:
    lost.setdefault(k['signal'], []).append(k['steps_lost'])
  result = {
      'config': args.config, 'steps': args.steps,
      'checkpoint_every': args.checkpoint_every, 'log_every': args.log_every,
      'kills': kills, 'max_steps_lost': {s: max(v) for s, v in lost.items()},
      'lost_within_checkpoint_interval': all(
          0 <= k['steps_lost'] <= args.checkpoint_every for k in kills),
      'max_lost_beyond_interval': max(
          max(0, k['steps_lost'] - args.checkpoint_every) for k in kills),
      'async_save': bool(args.async_save),
      'final_step': [meta_w.get('step'), meta_k.get('step')],
      'final_parameters_identical': same, 'max_abs_difference': worst,
      'uninterrupted_s': round(whole_s, 1), 'killed_and_restarted_s':
      round(killed_s, 1), 'memory': memory, 'workdir': base}
  print(f'{args.steps} steps, checkpoint every {args.checkpoint_every}, '
        f'{len(kills)} kills ({args.signals})')
  print(f'{"signal":8s} {"last logged":>11s} {"resumed at":>10s} '
        f'{"lost":>5s}')
  for k in kills:
    print(f'{k["signal"]:8s} {k["last_logged"]:11d} {k["resumed_at"]:10d} '
          f'{k["steps_lost"]:5d}')
  print(f'steps lost beyond the checkpoint interval: at most '
        f'{result["max_lost_beyond_interval"]}')
  print(f'final parameters identical: {same} (max |diff| {worst:g})')
  if memory:
    print('RSS (MB) of the uninterrupted run at ' + ', '.join(
        f'{k[len("rss_mb_at_"):].replace("_", " ")}: {v}'
        for k, v in memory.items() if k.startswith('rss_mb_at_')) +
          f'; growth from 10% / 50% of the steps to the end '
          f'{memory["growth_mb_10pct_to_end"]} / '
          f'{memory["growth_mb_50pct_to_end"]} MB '
          f'({memory["steps_per_s"]} steps/s)')
  print(f'uninterrupted {whole_s:.0f} s, killed + restarted {killed_s:.0f} s')
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  main()
