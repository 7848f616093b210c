"""Mapping tables from torchvision ``state_dict`` names to flaxseg variables.

One table per model family, written out from the architecture (depth, heads),
never guessed from names or shapes. An entry is ``(flax module path, torch
module prefix, kind)``; the kind says which tensors the module has and how
each is laid out:

==================  =========================================================
kind                tensors (torch -> flax)
==================  =========================================================
``conv``            ``weight`` (O, I, kh, kw) -> ``kernel`` (kh, kw, I, O)
``conv_bias``       the above and ``bias`` -> ``bias``
``bn``              ``weight`` -> ``scale``, ``bias`` -> ``bias`` (params);
                    ``running_mean`` -> ``mean``, ``running_var`` -> ``var``
                    (batch_stats); ``num_batches_tracked`` is dropped
``linear_conv``     a ``Linear`` weight (O, I kh kw) as a conv kernel whose
                    spatial size the target model gives (VGG's fc6: 7x7), and
                    its bias
==================  =========================================================

Families (torchvision module names, ``torchvision/models/resnet.py``,
``vgg.py`` and ``segmentation/{fcn,deeplabv3}.py``):

* ResNet-18/34/50/101/152: ``conv1``, ``bn1``, ``layer{s}.{i}.conv{k}`` /
  ``bn{k}`` / ``downsample.{0,1}`` -> ``conv1``, ``bn1``,
  ``layer{s}_block{i}/conv{k}`` / ``bn{k}`` / ``downsample_conv`` /
  ``downsample_bn``; the ImageNet classifier ``fc`` is not imported.
* VGG-16: ``features.{0,2,5,...,28}`` -> ``conv{stage}_{i}``;
  ``classifier.0`` and ``classifier.3`` -> ``fc6``, ``fc7`` (as
  convolutions); the ImageNet classifier ``classifier.6`` is not imported.
* ``fcn_resnet*``: ``backbone.*`` as ResNet, ``classifier.{0,1,4}`` ->
  ``head_conv``, ``head_bn``, ``classifier``; ``aux_classifier.{0,1,4}`` ->
  ``aux_conv``, ``aux_bn``, ``aux_classifier``.
* ``deeplabv3_resnet*``: ``backbone.*``; ``classifier.0`` (ASPP):
  ``convs.0.{0,1}`` -> ``aspp/conv1x1_{conv,bn}``, ``convs.{k+1}.{0,1}`` ->
  ``aspp/atrous{k}_{conv,bn}``, ``convs.4.{1,2}`` -> ``aspp/pool_{conv,bn}``,
  ``project.{0,1}`` -> ``aspp/project_{conv,bn}``; ``classifier.{1,2,4}`` ->
  ``head_conv``, ``head_bn``, ``classifier``; the auxiliary head as FCN's.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Tuple

from flaxseg.convert.errors import ConversionError
from flaxseg.models import resnet

KINDS = ('conv', 'conv_bias', 'bn', 'linear_conv')


class Entry(NamedTuple):
  """One module: flaxseg path (``/``-joined), torch prefix, kind."""
  flax: str
  torch: str
  kind: str


#: (stage, index) of VGG-16's conv layers -> index in ``features``.
VGG16_FEATURES = {
    (1, 1): 0, (1, 2): 2, (2, 1): 5, (2, 2): 7, (3, 1): 10, (3, 2): 12,
    (3, 3): 14, (4, 1): 17, (4, 2): 19, (4, 3): 21, (5, 1): 24, (5, 2): 26,
    (5, 3): 28,
}

#: Backbone architectures ``python -m flaxseg.convert backbone`` knows.
BACKBONES = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152',
             'vgg16')

#: Whole torchvision segmentation models and their flaxseg twins.
MODELS = {
    'fcn_resnet50': 'fcn_resnet50_tv',
    'fcn_resnet101': 'fcn_resnet101_tv',
    'deeplabv3_resnet50': 'deeplabv3_resnet50_tv',
    'deeplabv3_resnet101': 'deeplabv3_resnet101_tv',
}

#: Torch keys that are never imported, per family: BatchNorm's step counter
#: and the ImageNet classifiers.
IGNORED = {
    'resnet': (r'(^|\.)num_batches_tracked$', r'^fc\.(weight|bias)$'),
    'vgg16': (r'^classifier\.6\.(weight|bias)$',),
    'segmentation': (r'(^|\.)num_batches_tracked$',),
}


def _join(*parts: str) -> str:
  return '/'.join(p for p in parts if p)


def _dot(*parts: str) -> str:
  return '.'.join(p for p in parts if p)


def resnet_table(depth: int, flax_prefix: str = '',
                 torch_prefix: str = '') -> List[Entry]:
  """The ResNet-``depth`` entries (``flaxseg.models.resnet`` layout).

  Args:
    depth: 18, 34, 50, 101 or 152.
    flax_prefix: path of the ResNet inside the flaxseg model (``backbone``).
    torch_prefix: its prefix in the state dict (``backbone`` in the
      segmentation models, empty for an ImageNet classifier).

  Returns:
    The entries, stem first.
  """
  if depth not in resnet.STAGE_SIZES:
    raise ConversionError(f'ResNet depth {depth!r} is not one of '
                     f'{sorted(resnet.STAGE_SIZES)}')
  convs = 3 if resnet.is_bottleneck(depth) else 2
  out = [Entry(_join(flax_prefix, 'conv1'), _dot(torch_prefix, 'conv1'), 'conv'),
         Entry(_join(flax_prefix, 'bn1'), _dot(torch_prefix, 'bn1'), 'bn')]
  for stage, blocks in enumerate(resnet.STAGE_SIZES[depth], start=1):
    for i in range(blocks):
      f = _join(flax_prefix, f'layer{stage}_block{i}')
      t = _dot(torch_prefix, f'layer{stage}.{i}')
      for k in range(1, convs + 1):
        out.append(Entry(f'{f}/conv{k}', f'{t}.conv{k}', 'conv'))
        out.append(Entry(f'{f}/bn{k}', f'{t}.bn{k}', 'bn'))
      if i == 0:
        # Every torchvision ResNet has a projection in the first block of
        # layer2-4, and in layer1 when the block expands (Bottleneck).
        if stage > 1 or resnet.is_bottleneck(depth):
          out.append(Entry(f'{f}/downsample_conv', f'{t}.downsample.0', 'conv'))
          out.append(Entry(f'{f}/downsample_bn', f'{t}.downsample.1', 'bn'))
  return out


def vgg16_table(include_fc: bool, flax_prefix: str = '',
                torch_prefix: str = '') -> List[Entry]:
  """VGG-16's entries (``flaxseg.models.vgg`` layout).

  Args:
    include_fc: also ``fc6`` / ``fc7`` from ``classifier.0`` / ``.3``.
    flax_prefix: path of the VGG inside the flaxseg model (``backbone``).
    torch_prefix: its prefix in the state dict (empty for torchvision's
      ``vgg16``).

  Returns:
    The entries.
  """
  out = [Entry(_join(flax_prefix, f'conv{s}_{i}'),
               _dot(torch_prefix, f'features.{j}'), 'conv_bias')
         for (s, i), j in VGG16_FEATURES.items()]
  if include_fc:
    out.append(Entry(_join(flax_prefix, 'fc6'),
                     _dot(torch_prefix, 'classifier.0'), 'linear_conv'))
    out.append(Entry(_join(flax_prefix, 'fc7'),
                     _dot(torch_prefix, 'classifier.3'), 'linear_conv'))
  return out


def _fcn_head(flax_conv: str, flax_bn: str, flax_cls: str,
              torch_prefix: str) -> List[Entry]:
  return [Entry(flax_conv, f'{torch_prefix}.0', 'conv'),
          Entry(flax_bn, f'{torch_prefix}.1', 'bn'),
          Entry(flax_cls, f'{torch_prefix}.4', 'conv_bias')]


def fcn_resnet_table(depth: int, aux: bool) -> List[Entry]:
  """torchvision ``fcn_resnet{depth}`` -> ``fcn_resnet{depth}_tv``."""
  out = resnet_table(depth, 'backbone', 'backbone')
  out += _fcn_head('head_conv', 'head_bn', 'classifier', 'classifier')
  if aux:
    out += _fcn_head('aux_conv', 'aux_bn', 'aux_classifier', 'aux_classifier')
  return out


def deeplabv3_resnet_table(depth: int, aux: bool,
                           num_rates: int = 3) -> List[Entry]:
  """torchvision ``deeplabv3_resnet{depth}`` -> ``deeplabv3_resnet{depth}_tv``."""
  out = resnet_table(depth, 'backbone', 'backbone')
  aspp = 'classifier.0'
  branches = [('conv1x1', 'convs.0.0', 'convs.0.1')]
  branches += [(f'atrous{k}', f'convs.{k + 1}.0', f'convs.{k + 1}.1')
               for k in range(num_rates)]
  # ASPPPooling is (AdaptiveAvgPool2d, Conv, BN, ReLU): conv at 1, BN at 2.
  branches += [('pool', f'convs.{num_rates + 1}.1', f'convs.{num_rates + 1}.2'),
               ('project', 'project.0', 'project.1')]
  for name, conv, bn in branches:
    out.append(Entry(f'aspp/{name}_conv', f'{aspp}.{conv}', 'conv'))
    out.append(Entry(f'aspp/{name}_bn', f'{aspp}.{bn}', 'bn'))
  out += [Entry('head_conv', 'classifier.1', 'conv'),
          Entry('head_bn', 'classifier.2', 'bn'),
          Entry('classifier', 'classifier.4', 'conv_bias')]
  if aux:
    out += _fcn_head('aux_conv', 'aux_bn', 'aux_classifier', 'aux_classifier')
  return out


def backbone_table(arch: str, include_fc: bool = True
                   ) -> Tuple[List[Entry], Tuple[str, ...]]:
  """``(entries, ignored key patterns)`` of an ImageNet classifier.

  Args:
    arch: one of :data:`BACKBONES`.
    include_fc: VGG-16 only: import ``fc6``/``fc7`` too.

  Returns:
    The entries, rooted at the model's ``backbone``, and the regexes of torch
    keys that are dropped (the classifier, BatchNorm counters).
  """
  if arch not in BACKBONES:
    raise ConversionError(f'unknown backbone {arch!r}; expected one of '
                     f'{", ".join(BACKBONES)}')
  if arch == 'vgg16':
    ignored = IGNORED['vgg16']
    if not include_fc:
      ignored += (r'^classifier\.[03]\.(weight|bias)$',)
    return vgg16_table(include_fc, 'backbone'), ignored
  return resnet_table(int(arch[len('resnet'):]), 'backbone'), IGNORED['resnet']


def model_table(name: str, aux: bool) -> Tuple[List[Entry], Tuple[str, ...]]:
  """``(entries, ignored patterns)`` of a torchvision segmentation model.

  Args:
    name: a key of :data:`MODELS` (``deeplabv3_resnet101``) or its flaxseg
      twin (``deeplabv3_resnet101_tv``).
    aux: the auxiliary head is present.

  Returns:
    The entries and the regexes of torch keys that are dropped.
  """
  name = {v: k for k, v in MODELS.items()}.get(name, name)
  if name not in MODELS:
    raise ConversionError(f'no conversion table for {name!r}; expected one of '
                     f'{", ".join(sorted(MODELS))} (or their _tv names)')
  family, _, arch = name.partition('_resnet')
  depth = int(arch)
  table = (fcn_resnet_table(depth, aux) if family == 'fcn'
           else deeplabv3_resnet_table(depth, aux))
  return table, IGNORED['segmentation']


def tensor_names(entry: Entry) -> Dict[str, Tuple[str, str]]:
  """Torch key -> (collection, flaxseg leaf name) for one entry."""
  t = entry.torch
  if entry.kind == 'conv':
    return {f'{t}.weight': ('params', 'kernel')}
  if entry.kind in ('conv_bias', 'linear_conv'):
    return {f'{t}.weight': ('params', 'kernel'),
            f'{t}.bias': ('params', 'bias')}
  if entry.kind == 'bn':
    return {f'{t}.weight': ('params', 'scale'),
            f'{t}.bias': ('params', 'bias'),
            f'{t}.running_mean': ('batch_stats', 'mean'),
            f'{t}.running_var': ('batch_stats', 'var')}
  raise ConversionError(f'unknown entry kind {entry.kind!r}; expected one of '
                   f'{KINDS}')
