"""DeepLab v1 LargeFOV (Chen et al., "Semantic Image Segmentation with Deep
Convolutional Nets and Fully Connected CRFs", ICLR 2015).

The network of the released ``DeepLab-LargeFOV`` model (paper sec. 3.1 and
4.1, table 2): VGG-16 in its DeepLab form (`vgg.VGG16(style='deeplab')`):
3x3 pad-1 max pools, pool4 and pool5 at stride 1, conv5 dilated by 2, hence
output stride 8; the prototxt's ``pool5a`` 3x3 average pool; ``fc6`` a 3x3
convolution with dilation ("input stride") 12 and 1024 channels, ``fc7`` 1x1
1024, ReLU and dropout 0.5 after each; ``fc8`` 1x1 to the classes
(initialised N(0, 0.01), as the prototxt). Scores at stride 8 are bilinearly
upsampled to the input (sec. 3.2; Caffe's ``Interp`` layer, corner-aligned,
so a 321 input maps its 41 scores onto pixels 0, 8, ..., 320). 20,505,429
parameters with 21 classes (14,714,688 conv1-5 + 4,719,616 fc6 + 1,049,600
fc7 + 21,525 fc8).

The fully connected CRF of sec. 4 is post-processing on these outputs: it
takes the upsampled logits (or ``aux['logits_stride8']``, the raw stride-8
scores, for a CRF run at feature resolution) with the image; it plugs in at
evaluation through ``config.eval.crf`` (a later issue), not in this module.

Parameter names::

  backbone/conv1_1 ... conv5_3, fc6, fc7   (vgg.py; fc6/fc7 are DeepLab's
                                            subsampled 1024-channel layers)
  fc8                                      (the prototxt's fc8_voc12)
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.layers import canonicalize_dtype, resize_bilinear
from flaxseg.models.vgg import VGG16, validate_vgg

Array = jax.Array


class DeepLabV1(nn.Module):
  """DeepLab v1 (LargeFOV by default) on VGG-16; see the module docstring.

  Attributes:
    num_classes: output classes.
    width_multiplier: scales every VGG channel count (1.0 = paper).
    fc6_kernel: fc6 kernel (3 LargeFOV; 4x4 "DeepLab" of table 2 has 4).
    fc6_dilation: fc6 input stride (12 LargeFOV).
    fc6_features: fc6 channels (1024 LargeFOV).
    fc7_features: fc7 channels (1024 LargeFOV).
    dropout: rate after fc6 and fc7 (0.5).
    pool5a: the prototxt's 3x3 stride-1 average pool before fc6.
    align_corners: corner convention of the final upsampling (True: Caffe's
      Interp layer used by DeepLab).
    dtype: computation dtype; parameters stay float32, logits are float32.
  """
  num_classes: int
  width_multiplier: float = 1.0
  fc6_kernel: int = 3
  fc6_dilation: int = 12
  fc6_features: int = 1024
  fc7_features: int = 1024
  dropout: float = 0.5
  pool5a: bool = True
  align_corners: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False
               ) -> Tuple[Array, Dict[str, Array]]:
    """Segments a batch of images.

    Args:
      x: normalised images (N, H, W, 3), any H and W.
      train: dropout on (``'dropout'`` rng).

    Returns:
      ``(logits, aux)``: float32 logits (N, H, W, num_classes) and
      ``aux['logits_stride8']``, the float32 scores before upsampling.
    """
    dtype = canonicalize_dtype(self.dtype)
    height, width = x.shape[1:3]
    features = VGG16(
        style='deeplab', width_multiplier=self.width_multiplier,
        conv1_padding=1, pool5a=self.pool5a, fc6_features=self.fc6_features,
        fc6_kernel=self.fc6_kernel, fc6_dilation=self.fc6_dilation,
        fc6_padding='SAME', fc7_features=self.fc7_features,
        dropout=self.dropout, dtype=dtype, name='backbone')(x, train)
    scores = nn.Conv(self.num_classes, (1, 1), padding='VALID', dtype=dtype,
                     kernel_init=nn.initializers.normal(0.01),
                     name='fc8')(features['fc7']).astype(jnp.float32)
    logits = resize_bilinear(scores, (height, width),
                             align_corners=self.align_corners)
    return logits, {'logits_stride8': scores}


def deeplabv1_largefov(*, num_classes: int, dtype: Any = 'float32',
                       width_multiplier: float = 1.0, fc6_kernel: int = 3,
                       fc6_dilation: int = 12, fc6_features: int = 1024,
                       fc7_features: int = 1024, dropout: float = 0.5,
                       pool5a: bool = True, align_corners: bool = True,
                       bn_axis_name: Optional[str] = None) -> DeepLabV1:
  """DeepLab v1 LargeFOV (Chen et al. 2015, sec. 4.1, table 2).

  Args:
    num_classes: output classes.
    dtype: computation dtype ('float32', 'bfloat16' or a jnp dtype).
    width_multiplier: scales every VGG-16 channel count (1.0 = paper).
    fc6_kernel: fc6 kernel size (3 in LargeFOV).
    fc6_dilation: fc6 dilation (12 in LargeFOV).
    fc6_features: fc6 channels (1024 in LargeFOV).
    fc7_features: fc7 channels (1024 in LargeFOV).
    dropout: dropout after fc6 and fc7 (0.5).
    pool5a: keep the released prototxt's 3x3 average pool after pool5.
    align_corners: final upsampling convention (True: Caffe Interp).
    bn_axis_name: ignored (no BatchNorm); the trainer passes it to every
      model.

  Returns:
    A `DeepLabV1` module.
  """
  del bn_axis_name
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f'num_classes={num_classes!r} must be a positive integer')
  validate_vgg('deeplab', width_multiplier, 1, fc6_kernel, fc6_dilation,
               'SAME', dropout)
  for key, value in (('fc6_features', fc6_features),
                     ('fc7_features', fc7_features)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f'{key}={value!r} must be a positive integer')
  return DeepLabV1(num_classes=num_classes,
                   width_multiplier=float(width_multiplier),
                   fc6_kernel=fc6_kernel, fc6_dilation=fc6_dilation,
                   fc6_features=fc6_features, fc7_features=fc7_features,
                   dropout=float(dropout), pool5a=bool(pool5a),
                   align_corners=bool(align_corners),
                   dtype=canonicalize_dtype(dtype))
