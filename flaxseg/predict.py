"""Segment images with a trained model: label maps, overlays, probabilities.

  python -m flaxseg.predict --workdir=runs/demo IMAGE_OR_DIR ... --out=DIR
  python -m flaxseg.predict --checkpoint=runs/demo/checkpoints/3000 ... --out=DIR
  python -m flaxseg.predict --config=configs/deeplabv3.py:demo \\
      --workdir=runs/demo images/ --out=pred --flip --scales=0.75,1,1.25

For each image ``NAME`` it writes ``NAME.png`` (the label map as a palette
PNG: pixel values are class ids, colours the VOC palette, the class names in
its ``classes`` text chunk), ``NAME_overlay.png`` (the colours blended over
the image), with ``--panels`` ``NAME_panel.png`` (image | prediction |
overlay) and, with ``--probabilities``, ``NAME_probs.npy`` (float32
``[H, W, classes]``: the CRF's marginals when the CRF is on, else the
softmax). ``classes.json`` lists ids, names and colours; ``predictions.json``
lists every input, what was written for it, and every skipped file with the
reason.

The model and the inference mode come from the run's ``config.json`` (or
``--config``, which takes ``--config.eval.*`` overrides), adjusted by
``--scales``, ``--flip``, ``--window``, ``--output_stride`` and ``--crf``.
Prediction runs the evaluator's own mapped step (``flaxseg.train.evaluator``)
on the same padded canvases as evaluation (``config.data.eval_pad_size``; a
larger image is padded up to a multiple of ``--pad_multiple``), so its label
maps are exactly the ones the evaluator scores. Images of the same canvas are
batched together; each canvas size compiles once.

Files that cannot be read as images are reported by name and skipped; greyscale,
palette, RGBA and CMYK images are converted to RGB. Existing outputs are never
overwritten unless ``--overwrite``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Dict, List, Sequence, Tuple

from absl import app, flags, logging
import numpy as np

from flaxseg import cpu_malloc

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command line's flags (only when run as a command, so the
  module imports anywhere without claiming flag names)."""
  from flaxseg.train import from_run  # pylint: disable=g-import-not-at-top
  from_run.define_flags()
  flags.DEFINE_bool('probabilities', False, 'Also write NAME_probs.npy.')
  flags.DEFINE_bool('panels', False, 'Also write NAME_panel.png (image | '
                    'prediction | overlay).')
  flags.DEFINE_integer('window', None,
                       'Sliding-window side, 0 for whole images '
                       '(config.eval.window).')
  flags.DEFINE_integer('batch_size', 0,
                       'Images per batch (0: config.data.eval_batch_size).')
  flags.DEFINE_integer('pad_multiple', 32,
                       'Images larger than config.data.eval_pad_size are '
                       'padded up to a multiple of this.')
  flags.DEFINE_float('alpha', 0.5, 'Overlay opacity.')
  flags.DEFINE_bool('overwrite', False, 'Replace existing output files.')
  flags.DEFINE_bool('progress', True, 'Show a progress bar.')

class PredictError(ValueError):
  """Bad predict arguments or inputs (named in the message)."""


# -- inputs ----------------------------------------------------------------------
def list_inputs(paths: Sequence[str]) -> Tuple[List[str], List[Dict[str, str]]]:
  """The files to segment: each file given, and each file of each directory.

  Returns:
    ``(files, skipped)``; ``skipped`` lists paths that do not exist.
  """
  files, skipped = [], []
  for path in paths:
    if os.path.isdir(path):
      for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full) and not name.startswith('.'):
          files.append(full)
    elif os.path.isfile(path):
      files.append(path)
    else:
      skipped.append({'path': path, 'reason': 'no such file or directory'})
  return files, skipped


def output_names(files: Sequence[str]) -> List[str]:
  """Unique output stems: the file name without extension, ``_2``... on clashes."""
  seen, out = {}, []
  for path in files:
    stem = os.path.splitext(os.path.basename(path))[0]
    n = seen.get(stem, 0) + 1
    seen[stem] = n
    out.append(stem if n == 1 else f'{stem}_{n}')
  return out


def canvas_size(height: int, width: int, pad: int, multiple: int
                ) -> Tuple[int, int]:
  """The padded size an image runs at: the eval pad size, or larger."""
  def side(d):
    if d <= pad:
      return pad
    return -(-d // multiple) * multiple
  return side(height), side(width)


def normalize(image: np.ndarray, mean, std) -> np.ndarray:
  """The input pipeline's normalisation (``transforms.normalize``)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from flaxseg.data import transforms  # pylint: disable=g-import-not-at-top
  return transforms.normalize(tf.constant(image), mean, std).numpy()


# -- running -----------------------------------------------------------------------
def _progress(total: int, enabled: bool):
  if enabled and total > 1:
    try:
      import tqdm  # pylint: disable=g-import-not-at-top
      return tqdm.tqdm(total=total, unit='img', file=sys.stderr)
    except ImportError:
      pass
  return None


def predict(config, state, inputs: Sequence[str], out_dir: str, *,
            probabilities: bool = False, panels: bool = False,
            batch_size: int = 0,
            pad_multiple: int = 32, alpha: float = 0.5,
            overwrite: bool = False, progress: bool = True) -> Dict:
  """Segments ``inputs`` (files and directories) into ``out_dir``.

  Args:
    config: the run config (model, data normalisation, ``config.eval``).
    state: the host state (params and batch stats).
    inputs: image files and directories of images.
    out_dir: where the outputs go (created).
    probabilities: also write ``NAME_probs.npy``.
    panels: also write ``NAME_panel.png`` (image | prediction | overlay).
    batch_size: images per batch (0: ``config.data.eval_batch_size``),
      rounded up to a multiple of the devices.
    pad_multiple: padding multiple for images above the eval pad size.
    alpha: overlay opacity.
    overwrite: replace existing outputs (else they are an error, before
      anything is computed).
    progress: show a progress bar.

  Returns:
    The ``predictions.json`` record: ``images`` (path, outputs, size, class
    fractions) and ``skipped`` (path, reason).

  Raises:
    PredictError: when outputs exist (naming them) or no input is an image.
  """
  from flaxseg import viz  # pylint: disable=g-import-not-at-top
  from flaxseg.data import voc  # pylint: disable=g-import-not-at-top
  from flaxseg.train import builders, evaluator, parallel  # pylint: disable=g-import-not-at-top

  files, skipped = list_inputs(inputs)
  names = output_names(files)
  suffixes = (['.png', '_overlay.png'] +
              (['_probs.npy'] if probabilities else []) +
              (['_panel.png'] if panels else []))
  targets = [os.path.join(out_dir, n + s) for n in names for s in suffixes]
  targets += [os.path.join(out_dir, 'classes.json'),
              os.path.join(out_dir, 'predictions.json')]
  existing = [t for t in targets if os.path.exists(t)]
  if existing and not overwrite:
    raise PredictError(
        f'{len(existing)} output file(s) exist already, e.g. {existing[0]}: '
        'choose another --out or pass --overwrite (nothing was written)')

  # Decode everything first: unreadable files are reported and skipped.
  images = []
  for path, name in zip(files, names):
    try:
      images.append((path, name, voc.read_image(path)))
    except voc.DatasetError as e:
      skipped.append({'path': path, 'reason': str(e)})
  for item in skipped:
    print(f'skipped {item["path"]}: {item["reason"]}', file=sys.stderr)
  if not images:
    raise PredictError(f'no readable image among {list(inputs)}')

  dp = parallel.DataParallel(config.parallel)
  batch = batch_size or int(config.data.eval_batch_size)
  batch = -(-batch // dp.num_devices) * dp.num_devices
  p_predict = evaluator.map_predict_step(config, dp, probabilities)
  dstate = dp.put_state(state)
  pad = int(config.data.eval_pad_size)
  mean, std = tuple(config.data.mean), tuple(config.data.std)
  groups: Dict[Tuple[int, int], List[int]] = {}
  for i, (_, _, image) in enumerate(images):
    key = canvas_size(image.shape[0], image.shape[1], pad, pad_multiple)
    groups.setdefault(key, []).append(i)

  os.makedirs(out_dir, exist_ok=True)
  class_names = builders.class_names(config) or [
      str(i) for i in range(config.data.num_classes)]
  palette = voc.voc_palette()
  records = [None] * len(images)
  bar = _progress(len(images), progress)
  for (ch, cw), members in groups.items():
    for start in range(0, len(members), batch):
      chunk = members[start:start + batch]
      x = np.zeros((batch, ch, cw, 3), np.float32)
      height = np.zeros((batch,), np.int32)
      width = np.zeros((batch,), np.int32)
      for row, i in enumerate(chunk):
        image = images[i][2]
        h, w = image.shape[:2]
        x[row, :h, :w] = normalize(image, mean, std)
        height[row], width[row] = h, w
      out = p_predict(dstate, dp.put_batch(
          {'image': x, 'height': height, 'width': width}))
      pred = dp.fetch(out['prediction'], parallel.SHARDED)
      probs = (dp.fetch(out['probabilities'], parallel.SHARDED)
               if probabilities else None)
      for row, i in enumerate(chunk):
        path, name, image = images[i]
        h, w = image.shape[:2]
        label = np.asarray(pred[row, :h, :w], np.uint8)
        written = {'label': os.path.join(out_dir, name + '.png'),
                   'overlay': os.path.join(out_dir, name + '_overlay.png')}
        viz.save_palette_png(written['label'], label, class_names)
        viz.save_rgb(written['overlay'], viz.overlay(image, label, alpha))
        if panels:
          written['panel'] = os.path.join(out_dir, name + '_panel.png')
          viz.save_rgb(written['panel'], viz.label_panel(image, label, alpha))
        if probs is not None:
          written['probabilities'] = os.path.join(out_dir,
                                                  name + '_probs.npy')
          np.save(written['probabilities'],
                  np.asarray(probs[row, :h, :w], np.float32))
        counts = np.bincount(label.reshape(-1),
                             minlength=len(class_names)) / label.size
        records[i] = {
            'path': path, 'height': h, 'width': w, 'canvas': [ch, cw],
            'outputs': written,
            'classes': {class_names[c]: round(float(f), 6)
                        for c, f in enumerate(counts) if f > 0}}
        if bar is not None:
          bar.update(1)
  if bar is not None:
    bar.close()
  summary = {
      'model': config.model.name,
      'inference': dict(evaluator.inference_record(config),
                        crf=evaluator.crf_settings(config)),
      'images': records, 'skipped': skipped}
  with open(os.path.join(out_dir, 'classes.json'), 'w') as f:
    json.dump([{'id': i, 'name': n, 'color': palette[i].tolist()}
               for i, n in enumerate(class_names)], f, indent=1)
  with open(os.path.join(out_dir, 'predictions.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  return summary


def main(argv):
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  inputs = argv[1:]
  if not inputs:
    raise app.UsageError('give image files or directories to segment')
  from flaxseg.train import from_run  # pylint: disable=g-import-not-at-top
  try:
    config, state = from_run.from_flags(FLAGS, window=FLAGS.window)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  summary = predict(config, state, inputs, FLAGS.out,
                    probabilities=FLAGS.probabilities, panels=FLAGS.panels,
                    batch_size=FLAGS.batch_size,
                    pad_multiple=FLAGS.pad_multiple, alpha=FLAGS.alpha,
                    overwrite=FLAGS.overwrite, progress=FLAGS.progress)
  print(f'wrote {len(summary["images"])} prediction(s) to {FLAGS.out}'
        + (f'; skipped {len(summary["skipped"])} file(s)'
           if summary['skipped'] else ''))


def run() -> None:
  """The console-script entry point."""
  cpu_malloc.reexec_if_needed()
  define_flags()
  app.run(main)


if __name__ == '__main__':
  run()
