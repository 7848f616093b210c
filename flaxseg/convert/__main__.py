"""Converts torchvision weights into flaxseg checkpoints.

  # An ImageNet backbone, for config.model.backbone_init:
  python -m flaxseg.convert backbone --arch resnet101 \\
      --input resnet101.pth --output weights/resnet101
  # A whole torchvision segmentation model, for config.model.init_from:
  python -m flaxseg.convert model --model deeplabv3_resnet101 \\
      --input deeplabv3_resnet101.pth --output weights/deeplabv3_resnet101

``--input`` is a ``.pth``/``.pt`` state dict (read with
``torch.load(weights_only=True)``) or a ``.safetensors`` file (no torch
needed). The output is a directory in the layout of a flaxseg run
(``OUTPUT/checkpoints/0``, Orbax) holding ``params`` and ``batch_stats`` and a
metadata record of what was converted; an existing checkpoint there is never
overwritten.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from flaxseg.checkpoint import Checkpoints
from flaxseg.convert import tables
from flaxseg.convert.api import import_backbone, import_model
from flaxseg.convert.core import ConversionError, load_state_dict


def save_converted(output: str, variables, meta) -> str:
  """Writes converted variables as ``OUTPUT/checkpoints/0``; returns the path.

  Raises:
    ConversionError: when ``output`` already holds a checkpoint.
  """
  directory = os.path.join(os.path.abspath(output), 'checkpoints')
  ckpts = Checkpoints(directory, async_save=False)
  try:
    if ckpts.latest_step() is not None:
      raise ConversionError(f'{directory} already holds a checkpoint; choose '
                            'another --output (nothing was written)')
    ckpts.save(0, {'params': variables['params'],
                   'batch_stats': variables.get('batch_stats') or {}},
               dict(meta, step=0))
  finally:
    ckpts.close()
  return os.path.join(directory, '0')


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m flaxseg.convert', description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=__doc__.split('\n\n', 1)[1])
  sub = parser.add_subparsers(dest='command', required=True)
  bb = sub.add_parser('backbone', help='an ImageNet ResNet or VGG-16')
  bb.add_argument('--arch', required=True, choices=tables.BACKBONES)
  md = sub.add_parser('model', help='a torchvision segmentation model')
  md.add_argument('--model', required=True,
                  choices=sorted(tables.MODELS) + sorted(tables.MODELS.values()))
  md.add_argument('--num_classes', type=int, default=None,
                  help="default: the classifier's output channels")
  md.add_argument('--no_aux', action='store_true',
                  help='leave out the auxiliary head')
  for p in (bb, md):
    p.add_argument('--input', required=True,
                   help='.pth / .pt state dict or .safetensors file')
    p.add_argument('--output', required=True, help='output directory')
  return parser


def main(argv: Optional[List[str]] = None) -> int:
  """The command; returns the exit status (2 with a message on bad input)."""
  args = _parser().parse_args(argv)
  try:
    state_dict = load_state_dict(args.input)
    source = os.path.abspath(args.input)
    if args.command == 'backbone':
      variables = import_backbone(state_dict, args.arch, source=source)
      meta = {'kind': 'backbone', 'arch': args.arch,
              'model': {'name': f'{args.arch} backbone'}}
    else:
      variables, kwargs = import_model(
          state_dict, args.model, num_classes=args.num_classes,
          aux=False if args.no_aux else None, source=source)
      meta = {'kind': 'model', 'model': {'name': kwargs['name'],
                                         'aux': kwargs['aux']},
              'num_classes': kwargs['num_classes']}
    meta['converted_from'] = source
    where = save_converted(args.output, variables, meta)
  except ConversionError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  count = sum(v.size for c in ('params', 'batch_stats')
              for v in _leaves(variables.get(c) or {}))
  print(f'wrote {where} ({count:,} numbers from {len(state_dict)} tensors)')
  if meta['kind'] == 'model':
    print(f'use it with --config.model.name={meta["model"]["name"]} '
          f'--config.model.aux={meta["model"]["aux"]} '
          f'--config.data.num_classes={meta["num_classes"]} '
          f'--config.model.init_from={os.path.abspath(args.output)}')
  else:
    print(f'use it with --config.model.backbone_init='
          f'{os.path.abspath(args.output)}')
  return 0


def _leaves(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree


if __name__ == '__main__':
  sys.exit(main())
