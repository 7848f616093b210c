"""The performance benchmarks run end to end at tiny sizes (figures untested).

bench/vs_torchvision.py, bench/compile_memory.py, bench/pipeline.py and
bench/soak.py are meant for full-size runs (BENCHMARKS.md); here each runs
once on the smallest input that exercises every code path, and its JSON is
checked for shape.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))


def _run(script, *args, timeout=900):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'bench', script), *args],
      capture_output=True, text=True, timeout=timeout,
      env=dict(os.environ, PYTHONPATH=ROOT))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_vs_torchvision_runs(tmp_path):
  pytest.importorskip('torchvision', reason='the parity extra is not installed')
  out = tmp_path / 'tv.json'
  stdout = _run('vs_torchvision.py', '--models=fcn_resnet50_tv',
                '--train=1x33', '--infer=1x33', '--repeats=1', '--flops',
                '--peak_size=256', '--conv_impl=matmul', '--scan_blocks',
                f'--json={out}')
  result = json.loads(out.read_text())
  rows = result['rows']
  assert result['isolate'] == 'process'
  assert [(r['kind'], r['batch'], r['size'], r['conv_impl'], r['scan_blocks'])
          for r in rows] == [('train', 1, 33, 'matmul', True),
                             ('infer', 1, 33, 'matmul', True)]
  for r in rows:
    assert r['jax_s'] > 0 and r['torch_s'] > 0 and r['jax_gflop'] > 0
    assert 0 < r['fraction_of_peak'] < 5
    # Each framework in its own worker: its own peak RSS (JAX's worker holds
    # jaxlib and the compiled step, so it is never below ~100 MB).
    assert r['isolate'] == 'process'
    assert 100 < r['jax_peak_rss_mb'] < 20000
    assert 100 < r['torch_peak_rss_mb'] < 20000
  assert 'GFLOP/s' in stdout


def test_vs_torchvision_in_one_process(tmp_path):
  """``--isolate none``: both frameworks timed in the parent process; both
  dtypes (flaxseg's bfloat16 compute against torch's autocast)."""
  pytest.importorskip('torchvision', reason='the parity extra is not installed')
  out = tmp_path / 'tv.json'
  _run('vs_torchvision.py', '--models=fcn_resnet50_tv', '--train=1x33',
       '--infer=', '--repeats=1', '--isolate=none',
       '--dtype=float32,bfloat16', '--flops', '--peak_size=256',
       f'--json={out}')
  result = json.loads(out.read_text())
  assert result['isolate'] == 'none'
  assert sorted(result['peak_gflop_s']) == ['bfloat16', 'float32']
  rows = result['rows']
  assert [(r['kind'], r['dtype'], r['isolate']) for r in rows] == [
      ('train', 'float32', 'none'), ('train', 'bfloat16', 'none')]
  for row in rows:
    assert row['jax_s'] > 0 and row['torch_s'] > 0 and row['jax_gflop'] > 0
    assert 'jax_peak_rss_mb' not in row
    assert 'jax_peak_device_mb' not in row   # on the CPU: RSS only
  # The same program in both dtypes: XLA counts (almost) the same work.
  assert rows[1]['jax_gflop'] == pytest.approx(rows[0]['jax_gflop'], rel=0.05)


def test_vs_torchvision_counts_flops_of_the_program_not_the_backend():
  """`_flops` counts the HLO lowered for the CPU: the same figure whatever
  device runs the benchmark (a GPU's compiled cost analysis leaves out the
  convolutions it hands to cuDNN)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(ROOT, 'bench'))
  try:
    import vs_torchvision  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.remove(os.path.join(ROOT, 'bench'))
  conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  x, w = jnp.ones((2, 10, 12, 3)), jnp.ones((3, 3, 3, 5))
  # 2 FLOPs per multiply-add: batch 2, an 8x10 output, 3x3x3 taps, 5 outputs.
  assert vs_torchvision._flops(conv, x, w) == 2 * 2 * 8 * 10 * 27 * 5


def test_memstats_reports_this_process():
  """The shared peak-memory helpers: RSS on any machine; device memory only
  on an accelerator (None on the CPU, where RSS is the figure)."""
  import jax  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(ROOT, 'bench'))
  try:
    import memstats  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.remove(os.path.join(ROOT, 'bench'))
  # A 64 MiB buffer touched by this process shows up in its peak RSS.
  before = memstats.peak_rss_mb()
  block = bytearray(64 * 2**20)
  block[::4096] = b'x' * len(block[::4096])
  assert memstats.peak_rss_mb() >= max(before, 64)
  # A child started while this process holds it does not report it as its
  # own (Linux's ru_maxrss of a fresh child would).
  child = subprocess.run(
      [sys.executable, '-c', 'import memstats; print(memstats.peak_rss_mb())'],
      cwd=os.path.join(ROOT, 'bench'), capture_output=True, text=True,
      check=True)
  assert float(child.stdout) < memstats.peak_rss_mb() - 48, child.stdout
  del block
  device_mb = memstats.jax_device_peak_mb()
  if jax.devices()[0].platform == 'cpu':
    assert device_mb is None
  else:
    assert device_mb is None or device_mb >= 0


def test_compile_memory_runs(tmp_path):
  out = tmp_path / 'compile.json'
  _run('compile_memory.py', '--models=deeplabv3_resnet18', '--batch=1',
       '--crop=17', '--remat=both', '--scan_blocks=both', '--rss',
       '--dtype=bfloat16', '--conv_impl=xla', f'--json={out}')
  rows = json.loads(out.read_text())['rows']
  cases = [(r['model'], r['remat'], r['scan_blocks'], r['dtype'])
           for r in rows]
  assert cases == [('deeplabv3_resnet18', remat, scan, 'bfloat16')
                   for remat in (False, True) for scan in (False, True)]
  for r in rows:
    assert r['conv_impl'] == 'xla'
    assert r['compile_s'] > 0 and r['temp_mb'] > 0 and r['peak_mb'] > 0


def test_pipeline_runs(tmp_path):
  out = tmp_path / 'pipe.json'
  _run('pipeline.py', '--num_images=4', '--min_size=40', '--max_size=60',
       '--batch=2', '--crop=33', '--batches=2', '--warmup=1',
       '--model=deeplabv3_resnet18', '--step_batch=1', '--repeats=1',
       f'--json={out}')
  result = json.loads(out.read_text())
  assert result['pipeline_examples_per_s'] > 0
  assert result['margin'] > 0


def test_profile_step_runs(tmp_path):
  out = tmp_path / 'profile.json'
  stdout = _run('profile_step.py', '--model=deeplabv3_resnet18', '--batch=1',
                '--crop=33', '--conv_impl=matmul', f'--json={out}')
  report = json.loads(out.read_text())
  assert report['step_s'] > 0
  modules = {g['module'] for g in report['groups']}
  assert any(m.startswith('backbone/layer') for m in modules), modules
  assert 'aspp' in modules
  assert {g['pass'] for g in report['groups']} == {'fwd', 'bwd'}
  assert 'slowest non-matmul thunks' in stdout


def test_soak_runs(tmp_path):
  # One SIGTERM: train.py must exit 0 with a checkpoint at the step it was
  # in, so the restart loses nothing. (SIGKILLs: tests/train/test_kill.py.)
  out = tmp_path / 'soak.json'
  stdout = _run('soak.py', '--steps=12', '--kills=1', '--signals=TERM',
                '--log_every=2', '--checkpoint_every=4', '--sample_s=0.2',
                f'--workdir={tmp_path / "w"}', f'--out={out}')
  result = json.loads(out.read_text())
  assert 'final parameters identical: True' in stdout
  assert result['final_parameters_identical'] is True
  assert result['final_step'] == [12, 12]
  (kill,) = result['kills']
  assert kill['signal'] == 'SIGTERM' and kill['returncode'] == 0
  assert kill['steps_lost'] == 0 and kill['resumed_at'] >= kill['last_logged']
  assert result['memory']['rss_mb_peak'] > 0


def _device_check(tmp_path, *args, budget=None):
  env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / 'out'))
  if budget is not None:
    env['DEVICE_CHECK_BUDGET'] = str(budget)
  return subprocess.run(
      ['bash', os.path.join(ROOT, 'bench', 'device_check.sh'), *args],
      capture_output=True, text=True, timeout=600, env=env)


def test_device_check_runs_its_steps_at_toy_sizes(tmp_path):
  """The prepared accelerator run (bench/device_check.sh) at ``--tiny``
  sizes: each step it runs writes its log and JSON under $OUT. (Its other
  steps' command lines are those of the tests above.)"""
  proc = _device_check(tmp_path, '--tiny', '--steps', 'env,scan')
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'ran env:0 scan:0; skipped nothing' in proc.stdout
  out = tmp_path / 'out'
  assert 'jax' in (out / 'env.log').read_text()
  rows = json.loads((out / 'scan_r101.json').read_text())['rows']
  assert [(r['model'], r['scan_blocks']) for r in rows] == [
      ('deeplabv3_resnet18', True)]
  assert not (out / 'bf16_r50.json').exists()


def test_device_check_skips_what_its_budget_cannot_fit(tmp_path):
  proc = _device_check(tmp_path, '--tiny', budget=10)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'ran nothing; skipped env bf16 remat scan scan_step' in proc.stdout
  bad = _device_check(tmp_path, '--no-such-flag')
  assert bad.returncode == 2 and '--no-such-flag' in bad.stderr
