"""Export a trained model as a TensorFlow SavedModel (jax2tf, StableHLO inside).

  python -m flaxseg.export --workdir=runs/demo --out=exported/demo
  python -m flaxseg.export --workdir=runs/deeplabv1 --crf --out=exported/v1
  python -m flaxseg.export --checkpoint=converted/ --height=513 --width=513 ...

The SavedModel's ``serving_default`` signature takes ``images``: uint8
``[batch, height, width, 3]`` RGB of any batch size and image size (or the
fixed ``--height``/``--width``), and returns ``labels`` int32
``[batch, height, width]`` and ``probabilities`` float32
``[batch, height, width, classes]``. Normalisation, the inference mode of
``config.eval`` (scales, flips; a sliding window needs a fixed size) and,
with ``--crf`` or ``config.eval.crf.enabled``, the dense-CRF post-processing
are inside the graph. The weights are ``tf.Variable``\\ s; the computation is
the model's StableHLO, serialized by ``jax2tf`` with native serialization
(shape-polymorphic in batch, height and width), for CPU and, with
``--platforms``, GPU/TPU.

Load it with ``tf.saved_model.load(DIR).signatures['serving_default']`` (or
TF Serving).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from absl import app, flags, logging

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command line's flags (only when run as a command, so the
  module imports anywhere without claiming flag names)."""
  from flaxseg.train import from_run  # pylint: disable=g-import-not-at-top
  from_run.define_flags()
  flags.DEFINE_integer('height', 0, 'Fixed input height (0: any).')
  flags.DEFINE_integer('width', 0, 'Fixed input width (0: any).')
  flags.DEFINE_list('platforms', ['cpu'], 'Lowering platforms '
                    '(cpu, cuda, tpu).')

class ExportError(ValueError):
  """An export that cannot be made as asked (named in the message)."""


def serving_fn(config, settings=None, crf=None):
  """``fn(variables, images_uint8) -> {'labels', 'probabilities'}`` in JAX.

  The same computation as the evaluator's predict step on an unpadded batch:
  the pipeline's normalisation, ``inference.segment_logits`` under the
  config's inference mode, then the CRF (when on) and the argmax.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flaxseg import inference  # pylint: disable=g-import-not-at-top
  from flaxseg.train import builders, evaluator  # pylint: disable=g-import-not-at-top

  apply_fn = (evaluator.eval_apply_fn(config) or
              builders.build_model(config).apply)
  settings = settings or evaluator.inference_settings(config)
  crf = evaluator.crf_settings(config) if crf is None else crf
  mean = jnp.asarray(config.data.mean, jnp.float32)
  std = jnp.asarray(config.data.std, jnp.float32)

  def fn(variables, images):
    x = (images.astype(jnp.float32) / 255.0 - mean) / std
    logits = inference.segment_logits(apply_fn, variables, x, settings)
    if crf:
      probs = inference.crf_refine(logits, x, None, crf,
                                   mean=tuple(config.data.mean),
                                   std=tuple(config.data.std))
    else:
      probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return {'labels': jnp.argmax(probs, axis=-1).astype(jnp.int32),
            'probabilities': probs.astype(jnp.float32)}

  return fn


def export(config, state, out_dir: str, *, height: int = 0, width: int = 0,
           platforms: Sequence[str] = ('cpu',)) -> str:
  """Writes the SavedModel of ``state`` under ``config`` to ``out_dir``.

  Args:
    config: the run config (model, normalisation, ``config.eval``).
    state: the host state (params and batch stats are exported).
    out_dir: the SavedModel directory; must not exist.
    height, width: a fixed input size, or 0 for any.
    platforms: lowering platforms for the serialized StableHLO.

  Returns:
    ``out_dir``.

  Raises:
    ExportError: when ``out_dir`` exists, or the inference mode needs a fixed
      size (sliding window, the permutohedral CRF) and none was given.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  from flaxseg.train import evaluator  # pylint: disable=g-import-not-at-top

  if os.path.exists(out_dir):
    raise ExportError(f'{out_dir} exists: choose another --out (nothing was '
                      'written)')
  settings = evaluator.inference_settings(config)
  crf = evaluator.crf_settings(config)
  fixed = bool(height and width)
  if bool(height) != bool(width):
    raise ExportError('give both --height and --width, or neither')
  if not fixed and settings.window is not None:
    raise ExportError('a sliding window (config.eval.window) lays out its '
                      'windows for one input size: pass --height and --width')
  if not fixed and crf and crf['backend'] == 'permutohedral':
    raise ExportError("the permutohedral CRF sizes its lattice for one input "
                      "size: pass --height and --width, or use "
                      "--config.eval.crf.backend=window (or 'exact')")
  fn = serving_fn(config, settings, crf)
  variables = jax.device_get(state.variables)
  shape = f'(b, {height}, {width}, 3)' if fixed else '(b, h, w, 3)'
  tf_fn = jax2tf.convert(fn, polymorphic_shapes=[None, shape],
                         with_gradient=False,
                         native_serialization_platforms=tuple(platforms))
  module = tf.Module()
  module.variables_tree = tf.nest.map_structure(
      lambda a: tf.Variable(np.asarray(a), trainable=False), variables)
  spec = tf.TensorSpec([None, height or None, width or None, 3], tf.uint8,
                       name='images')

  @tf.function(autograph=False, input_signature=[spec])
  def serve(images):
    return tf_fn(module.variables_tree, images)

  module.serve = serve
  tmp = out_dir.rstrip('/') + f'.tmp-{os.getpid()}'
  tf.saved_model.save(module, tmp, signatures={'serving_default': serve})
  with open(os.path.join(tmp, 'flaxseg_export.json'), 'w') as f:
    json.dump({'model': config.model.to_dict(),
               'num_classes': int(config.data.num_classes),
               'mean': list(config.data.mean), 'std': list(config.data.std),
               'inference': evaluator.inference_record(config),
               'crf': crf, 'input': shape, 'platforms': list(platforms)},
              f, indent=1)
  os.replace(tmp, out_dir)
  return out_dir


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  from flaxseg.train import from_run  # pylint: disable=g-import-not-at-top
  try:
    config, state = from_run.from_flags(FLAGS)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  where = export(config, state, FLAGS.out, height=FLAGS.height,
                 width=FLAGS.width, platforms=FLAGS.platforms)
  print(f'wrote the SavedModel {where} (signature serving_default: uint8 '
        'images -> labels, probabilities)')


def run() -> None:
  """The console-script entry point."""
  define_flags()
  app.run(main)


if __name__ == '__main__':
  run()
