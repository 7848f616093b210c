"""Predict, evaluation modes, reports and export on a briefly trained model.

One tiny DeepLab v3 run on generated data (configs/deeplabv3.py:tiny) is
shared by every test here: ``python -m flaxseg.predict`` writes palette label
maps, overlays and probabilities equal to the evaluator's predictions; bad
files are named and skipped; a checkpoint of another model is refused; the
evaluation modes agree with plain inference where they must; the eval entry
point writes its reports; the SavedModel export loads in TensorFlow and
matches JAX.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import deeplabv3

from flaxseg import export as export_lib
from flaxseg import inference, predict
from flaxseg.checkpoint import CheckpointError
from flaxseg.data import voc
from flaxseg.train import builders, evaluator, from_run, loop, parallel
from flaxseg.train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A tiny trained run: (workdir, config as saved, host state)."""
  workdir = str(tmp_path_factory.mktemp('run'))
  loop.train_and_evaluate(deeplabv3.get_config('tiny'), workdir)
  config = builders.load_run_config(workdir)
  return workdir, config, evaluator.restore_for_eval(config, workdir)


@pytest.fixture(scope='module')
def voc_root(run):
  return os.path.join(run[0], 'synthetic_voc', 'VOCdevkit', 'VOC2012')


def evaluator_predictions(config, state, records):
  """``{record id: label map}`` from the evaluator's mapped eval step."""
  dp = parallel.DataParallel(config.parallel)
  p_eval = evaluator.map_eval_step(config, dp)
  dstate = dp.put_state(state)
  out = {}
  for batch in evaluator.eval_stream(config, records).as_numpy_iterator():
    inputs = {k: batch[k] for k in ('image', 'label', 'valid', 'height',
                                    'width')}
    pred = dp.fetch(p_eval(dstate, dp.put_batch(inputs))['prediction'],
                    parallel.SHARDED)
    for i in range(len(pred)):
      if batch['valid'][i]:
        h, w = int(batch['height'][i]), int(batch['width'][i])
        out[records[int(batch['index'][i])].id] = pred[i, :h, :w]
  return out


@pytest.fixture(scope='module')
def inputs(tmp_path_factory, voc_root):
  """The val images, a text file, a greyscale PNG and an RGBA PNG."""
  folder = tmp_path_factory.mktemp('inputs')
  for r in voc.list_records(voc_root, 'val'):
    shutil.copy(r.image_path, folder / os.path.basename(r.image_path))
  (folder / 'notes.txt').write_text('not an image')
  (folder / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 truncated')
  rng = np.random.RandomState(0)
  Image.fromarray(rng.randint(0, 255, (20, 30), np.uint8), 'L').save(
      folder / 'grey.png')
  Image.fromarray(rng.randint(0, 255, (40, 30, 4), np.uint8), 'RGBA').save(
      folder / 'rgba.png')
  return str(folder)


@pytest.fixture(scope='module')
def predicted(run, inputs, tmp_path_factory):
  _, config, state = run
  out = str(tmp_path_factory.mktemp('pred'))
  summary = predict.predict(config, state, [inputs], out, probabilities=True,
                            batch_size=3, progress=False)
  return out, summary


def test_predict_writes_label_maps_equal_to_the_evaluators(run, voc_root,
                                                           predicted):
  _, config, state = run
  out, summary = predicted
  records = voc.list_records(voc_root, 'val')
  want = evaluator_predictions(config, state, records)
  names = builders.class_names(config)
  for r in records:
    png = Image.open(os.path.join(out, r.id + '.png'))
    assert png.mode == 'P'
    assert json.loads(png.text['classes']) == names
    np.testing.assert_array_equal(np.asarray(png), want[r.id], err_msg=r.id)
    image = voc.read_image(r.image_path)
    overlay = np.asarray(Image.open(os.path.join(out, r.id + '_overlay.png')))
    assert overlay.shape == image.shape
    probs = np.load(os.path.join(out, r.id + '_probs.npy'))
    assert probs.shape == image.shape[:2] + (config.data.num_classes,)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probs.argmax(-1), want[r.id])
  with open(os.path.join(out, 'classes.json')) as f:
    assert [c['name'] for c in json.load(f)] == names
  assert len(summary['images']) == len(records) + 2


def test_predict_skips_unreadable_files_and_converts_modes(predicted):
  out, summary = predicted
  with open(os.path.join(out, 'predictions.json')) as f:
    record = json.load(f)
  skipped = {os.path.basename(s['path']): s['reason']
             for s in record['skipped']}
  assert set(skipped) == {'notes.txt', 'broken.jpg'}
  assert 'notes.txt' in skipped['notes.txt']
  for name, size in (('grey', (20, 30)), ('rgba', (40, 30))):
    assert np.asarray(Image.open(os.path.join(out, name + '.png'))).shape == (
        size)
  assert summary['inference']['scales'] == [1.0]


def test_predict_refuses_to_overwrite(run, inputs, predicted):
  _, config, state = run
  out, _ = predicted
  before = sorted((f, os.path.getmtime(os.path.join(out, f)))
                  for f in os.listdir(out))
  with pytest.raises(predict.PredictError, match='exist already'):
    predict.predict(config, state, [inputs], out, progress=False)
  after = sorted((f, os.path.getmtime(os.path.join(out, f)))
                 for f in os.listdir(out))
  assert before == after
  with pytest.raises(predict.PredictError, match='no readable image'):
    predict.predict(config, state, [os.path.join(inputs, 'notes.txt')],
                    out + '_none', progress=False)


def test_checkpoint_of_another_model_is_refused(run):
  workdir, config, _ = run
  other = builders.config_from_dict(config.to_dict())
  other.model.base_width = 16
  with pytest.raises(CheckpointError, match='model.base_width'):
    from_run.load_state(other, workdir, None, None)
  step_dir = os.path.join(workdir, 'checkpoints', str(config.train.num_steps))
  with pytest.raises(CheckpointError, match='model.base_width'):
    from_run.load_state(other, None, step_dir, None)


def test_checkpoint_path_and_config_from_metadata(run, tmp_path):
  workdir, config, state = run
  step_dir = os.path.join(workdir, 'checkpoints', str(config.train.num_steps))
  # A step directory inside a run finds the run's config.json.
  assert from_run.resolve_config(None, None, step_dir).to_dict() == (
      config.to_dict())
  # A bare checkpoint (no config.json) builds the config from its metadata.
  bare = str(tmp_path / 'bare')
  shutil.copytree(os.path.join(workdir, 'checkpoints'), bare)
  meta_config = from_run.resolve_config(None, None, bare)
  assert meta_config.model.to_dict() == {
      k: v for k, v in config.model.to_dict().items()
      if k not in ('init_from', 'backbone_init')}
  loaded = from_run.load_state(meta_config, None, bare, None)
  for a, b in zip(jax.tree.leaves(loaded.params),
                  jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_eval_modes_agree_with_plain_inference(run, voc_root):
  _, config, state = run
  records = voc.list_records(voc_root, 'val')
  batch = next(evaluator.eval_stream(config, records).as_numpy_iterator())
  x = jnp.asarray(batch['image'])
  apply = state.apply_fn

  def logits(**kwargs):
    settings = inference.Settings(align_corners=True, **kwargs)
    return np.asarray(jax.jit(lambda v, x: inference.segment_logits(
        apply, v, x, settings))(state.variables, x))

  plain = logits(merge='logits')
  np.testing.assert_array_equal(
      plain, np.asarray(jax.jit(step_lib.predict_logits)(state, x)))
  # One scale, no flip: exactly single-scale; a window covering the canvas
  # (33) is whole-image inference.
  np.testing.assert_array_equal(logits(scales=(1.0,), flip=False), plain)
  np.testing.assert_array_equal(logits(window=(33, 33)), plain)
  np.testing.assert_array_equal(logits(window=(64, 48)), plain)
  # Flip on the (asymmetric) synthetic images: mirrored back before the mean.
  f = lambda y: jax.nn.softmax(step_lib.predict_logits(state, y))
  want = np.log((f(x) + f(x[:, :, ::-1])[:, :, ::-1]) / 2)
  assert np.abs(x - x[:, :, ::-1]).max() > 0.5
  np.testing.assert_allclose(logits(flip=True), want, rtol=1e-5, atol=1e-5)
  # A real sliding window differs from whole-image inference but stays close.
  windowed = logits(window=(17, 17), stride=(8, 8))
  assert np.abs(windowed - plain).max() > 1e-4


def test_eval_entry_point_reports_at_another_output_stride(run):
  workdir, config, state = run
  assert config.model.output_stride == 8
  config = builders.config_from_dict(config.to_dict())
  config.eval.output_stride = 16
  config.eval.flip = True
  # Same parameters, another stride: different logits of the same shape.
  x = jnp.zeros((1, 33, 33, 3)) + jnp.arange(33.0)[None, None, :, None] / 33
  os16 = builders.build_model(config, output_stride=16)
  a = os16.apply(state.variables, x, train=False)[0]
  b = state.apply_fn(state.variables, x, train=False)[0]
  assert a.shape == b.shape and float(jnp.abs(a - b).max()) > 1e-4
  scores = evaluator.evaluate_checkpoint(config, workdir)
  with open(os.path.join(workdir, f'eval_{config.train.num_steps}.json')) as f:
    report = json.load(f)
  assert report['inference']['output_stride'] == 16
  assert report['inference']['flip'] is True
  assert report['miou'] == pytest.approx(scores['miou'])
  picture = Image.open(os.path.join(
      workdir, f'confusion_{config.train.num_steps}.png'))
  assert picture.mode == 'RGB' and min(picture.size) > 100
  with pytest.raises(ValueError, match='config.eval.output_stride'):
    unet = builders.config_from_dict(config.to_dict())
    unet.model = builders.config_from_dict({'name': 'fcn32s'})
    builders.build_model(unet, output_stride=16)


def test_training_writes_image_summaries(run):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  workdir, config, _ = run
  events = [os.path.join(workdir, f) for f in os.listdir(workdir)
            if f.startswith('events.out.tfevents')]
  tags = set()
  for path in events:
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        tags.add(value.tag)
  assert {f'eval/prediction_{i}' for i in range(config.eval.num_visualize)
          } <= tags
  assert 'eval/miou' in tags


def _savedmodel_outputs(path, images):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  serve = tf.saved_model.load(path).signatures['serving_default']
  out = serve(images=tf.constant(images))
  return {k: v.numpy() for k, v in out.items()}


def test_export_matches_jax_at_any_size(run, tmp_path):
  _, config, state = run
  config = builders.config_from_dict(config.to_dict())
  config.eval.scales, config.eval.flip = (0.75, 1.0), True
  path = export_lib.export(config, state, str(tmp_path / 'saved'))
  fn = jax.jit(export_lib.serving_fn(config))
  rng = np.random.RandomState(0)
  for shape in ((2, 29, 37, 3), (1, 40, 31, 3)):
    images = rng.randint(0, 256, shape).astype(np.uint8)
    got = _savedmodel_outputs(path, images)
    want = jax.device_get(fn(state.variables, images))
    np.testing.assert_allclose(got['probabilities'], want['probabilities'],
                               rtol=0, atol=1e-4)
    np.testing.assert_array_equal(got['labels'], want['labels'])
  with pytest.raises(export_lib.ExportError, match='exists'):
    export_lib.export(config, state, path)


def test_export_with_the_crf_inside(run, tmp_path):
  _, config, state = run
  config = builders.config_from_dict(config.to_dict())
  config.eval.crf.enabled = True
  config.eval.crf.num_iterations = 5
  with pytest.raises(export_lib.ExportError, match='--height'):
    export_lib.export(config, state, str(tmp_path / 'any'))
  path = export_lib.export(config, state, str(tmp_path / 'fixed'), height=29,
                           width=37)
  images = np.random.RandomState(1).randint(0, 256, (2, 29, 37, 3)).astype(
      np.uint8)
  got = _savedmodel_outputs(path, images)
  want = jax.device_get(jax.jit(export_lib.serving_fn(config))(
      state.variables, images))
  # TensorFlow's XLA compiles the same StableHLO with other fusions; the
  # lattice CRF amplifies the 1e-7 differences of the unary (a 1e-6 change
  # of this weak model's logits moves its marginals by 2e-4), so the
  # marginals agree to 1e-2 and the labels almost everywhere (the StableHLO
  # itself round-trips through jax.export exactly).
  np.testing.assert_allclose(got['probabilities'], want['probabilities'],
                             rtol=0, atol=1e-2)
  assert (got['labels'] == want['labels']).mean() > 0.99


def test_predict_command_line(run, inputs, tmp_path):
  workdir, _, _ = run
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = str(tmp_path / 'cli')
  done = subprocess.run(
      [sys.executable, '-m', 'flaxseg.predict', f'--workdir={workdir}',
       os.path.join(inputs, 'grey.png'), os.path.join(inputs, 'notes.txt'),
       f'--out={out}', '--flip', '--scales=0.5,1', '--noprogress',
       '--panels'],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'skipped' in done.stderr and 'notes.txt' in done.stderr
  assert os.path.exists(os.path.join(out, 'grey.png'))
  panel = np.asarray(Image.open(os.path.join(out, 'grey_panel.png')))
  assert panel.shape == (20, 3 * 30 + 2 * 4, 3)
  with open(os.path.join(out, 'predictions.json')) as f:
    assert json.load(f)['inference']['scales'] == [0.5, 1.0]
  # The export command shares these flags (and from_run.from_flags).
  done = subprocess.run(
      [sys.executable, '-m', 'flaxseg.export', f'--workdir={workdir}'],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  assert done.returncode != 0 and '--out is required' in done.stderr


def test_eval_modes_benchmark_runs(run, tmp_path):
  workdir, _, _ = run
  out = str(tmp_path / 'modes.json')
  done = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'bench', 'eval_modes.py'),
       f'--workdir={workdir}', '--modes=plain,flip,window',
       '--num_images=4', f'--json={out}'],
      capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT),
      cwd=ROOT, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  with open(out) as f:
    rows = json.load(f)['rows']
  assert [r['mode'] for r in rows] == ['plain', 'flip', 'window']
  assert all(0.0 <= r['miou'] <= 1.0 for r in rows)
  assert 'vs plain' in done.stdout
