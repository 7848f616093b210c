"""The CRF parameter search command (flaxseg.crf.search) on a tiny run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from flaxseg.crf import search
from flaxseg.train import loop

from crf_testing import tiny_v1_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  """A 2-step DeepLab v1 run: (config, workdir, final eval scores)."""
  config = tiny_v1_config(num_visualize=1)
  workdir = str(tmp_path_factory.mktemp('search_run'))
  result = loop.train_and_evaluate(config, workdir)
  return config, workdir, result['scores']


def test_parse_values():
  assert search.parse_values('5,10') == [5.0, 10.0]
  assert search.parse_values('50:10:100') == [50.0, 60.0, 70.0, 80.0, 90.0,
                                              100.0]
  assert search.parse_values('3:6, 4,8') == [3.0, 4.0, 5.0, 6.0, 8.0]
  assert search.parse_values('0.5:0.25:1') == [0.5, 0.75, 1.0]
  for bad in ('', 'a', '1:2:3:4', '5:1', '1:0:3'):
    with pytest.raises(ValueError):
      search.parse_values(bad)


def test_grid_is_validated(tiny_run):
  config, workdir, _ = tiny_run
  with pytest.raises(ValueError, match='bi_xy_std'):
    search.search(config, workdir, {'bi_xy_std': [0.0]}, num_images=4)
  with pytest.raises(ValueError, match='sigma'):
    search.search(config, workdir, {'sigma': [1.0]}, num_images=4)


def test_search_reports_every_setting_and_the_best(tiny_run):
  config, workdir, scores = tiny_run
  grid = {'bi_w': [0.0, 5.0], 'bi_xy_std': [5.0, 10.0], 'bi_rgb_std': [13.0],
          'pos_w': [3.0], 'pos_xy_std': [3.0]}
  lines = []
  report = search.search(config, workdir, grid, num_images=-1,
                         log=lines.append)
  assert len(report['results']) == 4
  assert {(r['bi_w'], r['bi_xy_std']) for r in report['results']} == {
      (0.0, 5.0), (0.0, 10.0), (5.0, 5.0), (5.0, 10.0)}
  assert report['best']['miou'] == max(r['miou'] for r in report['results'])
  # The cached logits give the trainer's own no-CRF eval on the same images.
  assert report['no_crf']['miou'] == pytest.approx(
      scores['no_crf']['miou'], abs=1e-9)
  # config.eval.crf's setting, evaluated beside the grid, is the trainer's.
  assert report['config_setting']['miou'] == pytest.approx(scores['miou'],
                                                           abs=1e-9)
  # The same setting inside the vectorised grid gives the same number.
  row = [r for r in report['results']
         if r['bi_w'] == 5.0 and r['bi_xy_std'] == 10.0][0]
  assert row['miou'] == pytest.approx(scores['miou'], abs=1e-9)
  text = '\n'.join(lines)
  assert 'without the CRF' in text and 'best (' in text
  assert '--config.eval.crf.bi_w=' in text
  with open(os.path.join(workdir, 'crf_search_2.json')) as f:
    saved = json.load(f)
  assert saved['best'] == report['best']
  assert saved['num_images'] == config.data.synthetic.num_val


def test_command_line(tiny_run):
  config, workdir, _ = tiny_run
  del config
  proc = subprocess.run(
      [sys.executable, '-m', 'flaxseg.crf.search',
       '--config=' + os.path.join(ROOT, 'configs', 'deeplabv1.py') + ':tiny',
       '--workdir=' + workdir, '--num_images=4', '--bi_w=4',
       '--bi_xy_std=10', '--bi_rgb_std=3:2:5', '--include_config_setting=false',
       '--config.train.num_steps=2', '--config.eval.crf.num_iterations=3'],
      capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'best (bi_w=4, bi_xy_std=10, bi_rgb_std=' in proc.stdout
  with open(os.path.join(workdir, 'crf_search_2.json')) as f:
    saved = json.load(f)
  assert saved['num_images'] == 4 and saved['config_setting'] is None
  assert [r['bi_rgb_std'] for r in saved['results']] == [3.0, 5.0]
  assert np.isfinite(saved['best']['miou'])


def test_trainer_eval_with_crf_writes_both_scores(tiny_run):
  config, workdir, scores = tiny_run
  assert 'no_crf' in scores and scores['crf']['bi_xy_std'] == 10.0
  with open(os.path.join(workdir, 'eval_2.json')) as f:
    report = json.load(f)
  assert 0.0 <= report['miou'] <= 1.0
  assert 0.0 <= report['no_crf']['miou'] <= 1.0
  assert report['crf'] == loop.crf_settings(config)
  # The CRF only relabels pixels: the same pixels are counted.
  assert (np.sum(report['confusion'])
          == np.sum(report['no_crf']['confusion']))
  assert os.listdir(os.path.join(workdir, 'predictions', 'step_2'))
  again = loop.evaluate_checkpoint(config, workdir)
  np.testing.assert_array_equal(again['confusion'], scores['confusion'])
  np.testing.assert_array_equal(again['no_crf']['confusion'],
                                scores['no_crf']['confusion'])
  # Off: the same network scores, and no CRF block.
  config = config.copy_and_resolve_references()
  config.eval.crf.enabled = False
  plain = loop.evaluate_checkpoint(config, workdir)
  assert 'no_crf' not in plain
  np.testing.assert_array_equal(plain['confusion'],
                                scores['no_crf']['confusion'])
