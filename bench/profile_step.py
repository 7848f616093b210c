"""Where a training step's time goes: a profile grouped by layer and pass.

  python bench/profile_step.py --model deeplabv3_resnet50_tv --batch 4 \\
      --crop 321 --conv_impl matmul --json profile.json

Compiles the jitted training step of ``--model`` (random weights, 21
classes, float32, SGD momentum, state donated), runs it once to warm up,
then once under ``jax.profiler.trace`` and reads the trace back
(``*.xplane.pb``, parsed with the protobuf bindings TensorFlow ships). Each
XLA thunk is attributed, through the ``op_name`` metadata of the compiled
HLO, to the model's module path (``backbone/layer4``, ``aspp``, ...), to the
forward or backward pass (``transpose(jvp(...))``), and to ``dot`` (matmul
and convolution library calls) or ``other`` (fused elementwise work:
BatchNorm, ReLU, pads, copies). It prints the step time, the busiest groups
and the slowest single non-matmul thunks. On XLA:CPU this is what showed
that ASPP's rate-36 convolutions on a 41x41 map spend most of their time
multiplying padding (see ``layers.MatmulConv``).
"""

import argparse
import collections
import glob
import json
import re
import tempfile
import time

import jax

_NOISE = ('jit', 'dot', 'reduce', 'add', 'mul', 'sub', 'max', 'select',
          'conv', 'slice', 'concat', 'pad', 'integer_pow', 'div', 'exp')


def _group(op_name):
  """``(pass, module path, ...)`` of an HLO ``op_name``."""
  backward = 'transpose(' in op_name
  path = re.sub(r'jit\([^)]*\)/|transpose\(|jvp\(|\)', '', op_name).split('/')
  modules = [p for p in path[1:3] if p and not p.startswith(_NOISE)]
  module = re.sub(r'_block\d+', '', '/'.join(modules)) or '(top level)'
  return ('bwd' if backward else 'fwd'), module


def profile(model_name, batch, crop, conv_impl, trace_dir):
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top
  # The training-step setup of the sibling script (bench/ is on sys.path).
  from compile_memory import build  # pylint: disable=g-import-not-at-top
  state, data, step = build(model_name, batch, crop, remat=False,
                            conv_impl=conv_impl)
  compiled = step.lower(state, data).compile()
  state, m = compiled(state, data)
  jax.block_until_ready(m)
  with jax.profiler.trace(trace_dir):
    t0 = time.perf_counter()
    state, m = compiled(state, data)
    jax.block_until_ready(m)
    step_s = time.perf_counter() - t0
  ops = {}
  for match in re.finditer(r'^\s*(?:ROOT )?%([\w.\-]+) = (\S+) .*?'
                           r'op_name="([^"]+)"', compiled.as_text(), re.M):
    ops[match.group(1)] = (match.group(2), match.group(3))
  space = xplane_pb2.XSpace()
  with open(glob.glob(f'{trace_dir}/**/*.xplane.pb', recursive=True)[0],
            'rb') as f:
    space.ParseFromString(f.read())
  groups, thunks = collections.Counter(), collections.Counter()
  for plane in space.planes:
    names = {k: v.name for k, v in plane.event_metadata.items()}
    for line in plane.lines:
      if not line.name.startswith('tf_XLA'):
        continue
      for event in line.events:
        name = names.get(event.metadata_id, '?')
        if name.startswith('ThunkExecutor') or name not in ops:
          continue
        seconds = event.duration_ps / 1e12
        shape, op_name = ops[name]
        kind = ('dot' if re.search(r'dot_general|conv_general', op_name) and
                not re.search(r'_pad|pad$|slice$', op_name) else 'other')
        groups[_group(op_name) + (kind,)] += seconds
        if kind == 'other':
          thunks[(name, shape, op_name)] += seconds
  return step_s, groups, thunks


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='deeplabv3_resnet50_tv')
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--crop', type=int, default=321)
  parser.add_argument('--conv_impl', default='',
                      help="'xla', 'matmul', 'taps' or 'auto' (default: the "
                      "model's)")
  parser.add_argument('--top', type=int, default=20)
  parser.add_argument('--json', default='')
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as trace_dir:
    step_s, groups, thunks = profile(args.model, args.batch, args.crop,
                                     args.conv_impl or None, trace_dir)
  total = sum(groups.values())
  print(f'{args.model} train step {args.batch}x{args.crop} '
        f'conv_impl={args.conv_impl or "default"}: {step_s:.2f} s '
        f'({total:.2f} s of thunks; > step time where thunks overlap)')
  print(f'{"seconds":>8s} {"share":>6s}  pass module kind')
  for (direction, module, kind), s in groups.most_common(args.top):
    print(f'{s:8.3f} {100 * s / total:5.1f}%  {direction} {module} {kind}')
  print('slowest non-matmul thunks:')
  for (name, shape, op_name), s in thunks.most_common(min(args.top, 10)):
    print(f'{s:8.3f}  {name} {shape} {op_name[-70:]}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'model': args.model, 'batch': args.batch, 'crop': args.crop,
                 'conv_impl': args.conv_impl or None, 'step_s': step_s,
                 'groups': [{'pass': d, 'module': m, 'kind': k, 'seconds': s}
                            for (d, m, k), s in groups.most_common()]},
                f, indent=1)


if __name__ == '__main__':
  # Before JAX starts: keep XLA:CPU's buffers mapped (flaxseg/cpu_malloc.py).
  from flaxseg import cpu_malloc  # pylint: disable=g-import-not-at-top
  cpu_malloc.reexec_if_needed()
  main()
