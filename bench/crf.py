"""Dense-CRF benchmark: flaxseg's backends against pydensecrf2, same run.

  python bench/crf.py                      # 240x320 and 500x375, 21 classes
  python bench/crf.py --sizes 240x320 --repeats 5 --json out.json
  python bench/crf.py --backends permutohedral,window,window/4

For each size it builds one synthetic image (coloured blocks plus noise) and
random softmax unaries, runs pydensecrf2 (if installed) and each flaxseg
backend with pydensecrf's standard parameters (smoothness sxy=3 w=3;
appearance sxy=80 srgb=13 w=10; 5 iterations), and prints the median time of
``--repeats`` runs (jit compile excluded, reported separately), the ratio
pydensecrf_time / backend_time (> 1 means flaxseg is faster), and the label
agreement and max |dQ| against pydensecrf.

Backends: ``exact`` (O(N^2) memory: small sizes only), ``permutohedral``,
``window`` (ConvCRF's 11x11 window at full resolution) and ``window/S`` (the
same window on a grid downsampled by ``S``; ConvCRF's default is ``blur=4``,
Teichmann & Cipolla 2018).
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from flaxseg.crf import meanfield


def _case(h, w, num_labels, seed=0):
  rng = np.random.default_rng(seed)
  blocks = ((np.arange(h)[:, None] // 40) * 5 + np.arange(w)[None] // 50)
  blocks %= num_labels
  colours = rng.uniform(0, 255, (num_labels, 3))
  image = np.clip(colours[blocks] + rng.normal(0, 10, (h, w, 3)), 0, 255)
  probs = rng.dirichlet(np.ones(num_labels), (h, w)).astype(np.float32)
  return image.astype(np.uint8), probs


def _pydensecrf(image, probs, iterations):
  import pydensecrf.densecrf as dcrf  # pylint: disable=g-import-not-at-top
  h, w, n = probs.shape
  crf = dcrf.DenseCRF2D(w, h, n)
  crf.setUnaryEnergy(np.ascontiguousarray(
      -np.log(np.clip(probs, 1e-5, 1)).reshape(-1, n).T))
  crf.addPairwiseGaussian(sxy=3, compat=3)
  crf.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.ascontiguousarray(image),
                           compat=10)
  return np.array(crf.inference(iterations)).T.reshape(h, w, n)


def _median_time(fn, repeats):
  times = []
  out = None
  for _ in range(repeats):
    t = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times), out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--sizes', default='240x320,375x500',
                      help='comma-separated HxW sizes')
  parser.add_argument('--labels', type=int, default=21)
  parser.add_argument('--iterations', type=int, default=5)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--backends', default='permutohedral,window,window/4',
                      help="flaxseg backends ('exact' is O(N^2): small only; "
                      "'window/S' downsamples by S)")
  parser.add_argument('--json', default='', help='write the results here')
  args = parser.parse_args()

  results = []
  for size in args.sizes.split(','):
    h, w = (int(v) for v in size.split('x'))
    image, probs = _case(h, w, args.labels)
    row = {'size': size, 'device': str(jax.devices()[0])}
    ref = None
    try:
      row['pydensecrf_s'], ref = _median_time(
          lambda: _pydensecrf(image, probs, args.iterations), args.repeats)
    except ImportError:
      row['pydensecrf_s'] = None
    logits = meanfield.logits_from_probabilities(jnp.asarray(probs))[None]
    img = jnp.asarray(image, jnp.float32)[None]
    for backend in args.backends.split(','):
      name, _, factor = backend.partition('/')
      fn = jax.jit(lambda l, i, b=name, s=int(factor or 1): meanfield.dense_crf(
          l, i, backend=b, downsample=s, num_iterations=args.iterations))
      t = time.perf_counter()
      jax.block_until_ready(fn(logits, img))
      compile_s = time.perf_counter() - t
      run_s, q = _median_time(
          lambda: jax.block_until_ready(fn(logits, img)), args.repeats)
      q = np.asarray(q)[0]
      entry = {'run_s': run_s, 'first_call_s': compile_s}
      if ref is not None:
        entry['speed_vs_pydensecrf'] = row['pydensecrf_s'] / run_s
        entry['label_agreement'] = float(
            (q.argmax(-1) == ref.argmax(-1)).mean())
        entry['max_abs_dq'] = float(np.abs(q - ref).max())
      row[backend] = entry
    results.append(row)
    print(f'{size}: pydensecrf2 {row["pydensecrf_s"]}')
    for backend in args.backends.split(','):
      e = row[backend]
      extra = ''
      if 'speed_vs_pydensecrf' in e:
        extra = (f'  ratio {e["speed_vs_pydensecrf"]:.3f}x  labels equal '
                 f'{e["label_agreement"]:.4f}  max|dQ| {e["max_abs_dq"]:.2e}')
      print(f'  {backend:14s} {e["run_s"]:.3f} s (first call '
            f'{e["first_call_s"]:.1f} s){extra}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  # Before JAX starts: keep XLA:CPU's buffers mapped (flaxseg/cpu_malloc.py).
  from flaxseg import cpu_malloc  # pylint: disable=g-import-not-at-top
  cpu_malloc.reexec_if_needed()
  main()
