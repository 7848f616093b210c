"""Train or evaluate a flaxseg model from a config file.

  python train.py --config=configs/deeplabv3.py --workdir=runs/deeplabv3
  python train.py --config=configs/deeplabv3.py:demo --workdir=runs/demo
  python train.py --config=configs/deeplabv3.py --config.optim.lr=0.01 ...
  python train.py --config=... --workdir=... --mode=eval   # latest checkpoint

Flags only: the work happens in ``flaxseg.train.loop``.
"""

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Recipe file (PATH[:VARIANT]).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints, logs and pictures go here.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval'],
                  'train (resumes from workdir) or eval (latest checkpoint).')
flags.DEFINE_integer('step', None, 'With --mode=eval: which checkpoint step.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # library INFO chatter off
  from flaxseg.train import loop  # pylint: disable=g-import-not-at-top
  if FLAGS.mode == 'train':
    loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  else:
    loop.evaluate_checkpoint(FLAGS.config, FLAGS.workdir, FLAGS.step)


if __name__ == '__main__':
  # Before JAX starts: keep XLA:CPU's buffers mapped (flaxseg/cpu_malloc.py).
  from flaxseg import cpu_malloc  # pylint: disable=g-import-not-at-top
  cpu_malloc.reexec_if_needed()
  app.run(main)
