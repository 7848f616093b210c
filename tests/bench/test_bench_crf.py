"""bench/crf.py runs end to end at a tiny size (its figures are not tested)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))


def test_crf_benchmark_runs(tmp_path):
  out = tmp_path / 'crf.json'
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'bench', 'crf.py'), '--sizes',
       '12x16', '--labels', '3', '--repeats', '1', '--backends',
       'exact,window,window/2,permutohedral', '--json', str(out)],
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (row,) = json.loads(out.read_text())
  for backend in ('exact', 'window', 'window/2', 'permutohedral'):
    assert row[backend]['run_s'] > 0
  assert '12x16' in proc.stdout
