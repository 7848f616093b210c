"""CRF-RNN on PASCAL VOC (Zheng et al., "Conditional Random Fields as
Recurrent Neural Networks", ICCV 2015).

FCN-8s + CRF-as-RNN (``crfasrnn`` model), trained in the paper's two stages
(sec. 5, "Implementation details"):

1. FCN-8s alone: the FCN recipe (``configs/fcn8s.py``; variant ``stage1``
   here runs it on this recipe's data).
2. The whole network end to end, initialised from stage 1
   (``config.model.init_from`` = the stage-1 workdir; FCN-8s's parameters keep
   their names inside ``crfasrnn``, the CRF's start at their initial values):
   SGD, learning rate 1e-13 on the unnormalised loss (sec. 5: "learning rate
   10^-13 and momentum 0.99"), weight decay 5e-4, whole images (batch 1,
   500x500 padding, FCN's setting), T = 5 mean-field iterations in training
   and 10 at test time (sec. 5), CRF settings of the released model
   (theta_alpha 160, theta_beta 3, theta_gamma 3, spatial weight 3, bilateral
   weight 5; ``flaxseg/crf/rnn.py``).

The paper trains on VOC 2012 + SBD + a COCO subset (74.7 mean IU on VOC 2012
test with COCO; 72.0 without, table 3); ``train_aug`` / ``val`` are this
library's nearest splits. The number of end-to-end iterations is not given in
the paper; 100k (FCN's count) is used.

  python train.py --config=configs/crfasrnn.py:stage1 --workdir=runs/fcn8s \
      --config.data.root=/data/VOCdevkit/VOC2012 \
      --config.data.sbd_root=/data/benchmark_RELEASE/dataset
  python train.py --config=configs/crfasrnn.py --workdir=runs/crfasrnn \
      --config.model.init_from=runs/fcn8s \
      --config.data.root=/data/VOCdevkit/VOC2012 \
      --config.data.sbd_root=/data/benchmark_RELEASE/dataset

Variants (``configs/crfasrnn.py:NAME``):
  stage1      stage 1 (FCN-8s, the configs/fcn8s.py recipe).
  tiny        a few end-to-end steps of a narrow CRF-RNN on tiny synthetic
              images, for tests.
  tiny_stage1 stage 1 of the tiny run.
"""

from configs import common


def get_config(arg=None):
  """Returns the config for variant ``arg`` (None: stage 2, the paper's)."""
  variants = (None, '', 'paper', 'stage1', 'tiny', 'tiny_stage1')
  if arg not in variants:
    raise ValueError(f'configs/crfasrnn.py: unknown variant {arg!r} '
                     f'(expected one of stage1, tiny, tiny_stage1)')
  tiny = arg in ('tiny', 'tiny_stage1')
  c = common.fcn_recipe('fcn8s', 1e-14, 'upscore8', 'tiny' if tiny else None)
  if arg in ('stage1', 'tiny_stage1'):
    return c
  c.model.name = 'crfasrnn'
  c.model.num_iterations = 5
  c.model.eval_iterations = 10
  c.model.init_from = ''
  if not tiny:
    c.optim.lr = 1e-13
    return c
  # Tiny images (24-32 px): the released bandwidths are for 500x375 photos.
  c.model.theta_alpha = 8.0
  c.model.num_iterations = 2
  c.model.eval_iterations = 3
  return c
