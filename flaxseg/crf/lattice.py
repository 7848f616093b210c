"""Permutohedral-lattice Gaussian filter (pydensecrf's message passing).

The permutohedral lattice of Adams, Baek & Davis ("Fast High-Dimensional
Filtering Using the Permutohedral Lattice", Eurographics 2010) approximates

    m_i = sum_j exp(-|f_i - f_j|^2 / 2) v_j

in O(N d^2) by splatting the values onto the vertices of the enclosing
simplices of a ``d``-dimensional lattice, blurring along its ``d + 1``
directions with the ``[0.5, 1, 0.5]`` kernel, and slicing back. This module
follows pydensecrf's ``Permutohedral::init`` / ``seqCompute``
(lucasb-eyer/pydensecrf, ``densecrf/src/permutohedral.cpp``) step by step:

* elevation ``y = E f`` with the scale factors
  ``sqrt(2/3) (d+1) / sqrt((i+1)(i+2))``;
* the nearest remainder-0 point (round to nearest, as the SSE build does),
  the rank of each coordinate and the barycentric weights (with the
  wrap-around ``b_0 += 1 + b_{d+1}``);
* the vertex keys ``rem0 + canonical[r, rank]`` (the first ``d`` coordinates);
* blur neighbours along direction ``j``: ``key - 1`` with ``key[j] + d`` and
  ``key + 1`` with ``key[j] - d``; absent neighbours contribute zero;
* blur ``v <- v + 0.5 (v[n1] + v[n2])`` for ``j = 0..d`` and slicing with
  ``alpha = 1 / (1 + 2^-d)``.

Under ``jit`` the lattice has a fixed capacity of ``N (d+1)`` vertices (the
most there can be); pydensecrf's hash table is replaced by a sort:

* Every coordinate of the key of simplex corner ``r`` is ``r`` modulo
  ``d + 1``, so a vertex is ``(q, r)`` with ``key = r + (d+1) q``. Packed in
  mixed radix (``q`` relative to its per-column minimum, one spare digit on
  each side for the neighbours) it is one int32, whenever the ranges allow
  (a runtime test; a ``lax.cond`` falls back to a lexicographic sort of the
  ``d + 1`` columns otherwise). XLA's key-only int32 sort is several times
  faster than any sort with payload or several keys.
* Deduplication: the sorted keys' distinct values are the vertices (vertex
  ``i`` is the ``i``-th smallest key); a binary search of each (point,
  corner) key gives its vertex, a binary search of the ``d + 1`` neighbour
  keys of each vertex gives the blur neighbours.
* Buckets: real images use a small fraction of the capacity (a 240x320
  image has about 10k position and 15k bilateral vertices for 230k and 460k
  slots), so the neighbour search and the blur run over the first ``S``
  vertices only, ``S`` the smallest of a few static sizes (halving from the
  capacity) that holds the batch's largest vertex count, chosen with
  ``lax.switch``. Splat and slice work per (point, corner) and do not
  depend on ``S``.

:func:`build_lattice_batch` runs once per image batch;
:func:`permutohedral_filter` reuses it for every mean-field iteration. The
``lax.switch``/``lax.cond`` predicates are batch-wide scalars, so under
``jit`` only the chosen branch runs; if the single-image functions are
``vmap``-ed by a caller, the conditionals become selects (all branches run,
results unchanged, slower), hence the batched entry points.

Gradient. The filter is linear in the values: ``out = alpha S^T B_d..B_0 S v``
with ``S`` the splat matrix and each blur ``B_j`` symmetric, so its transpose
is the same filter with the blur directions in reverse order (pydensecrf's
``compute(..., reverse=true)``, used by its ``applyTranspose``). The filter
is a ``jax.custom_vjp`` whose backward pass is that reversed lattice filter
applied to the cotangent; no gradient flows into the lattice (the
features), i.e. the barycentric weights are treated as constants.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

#: Sorts after every real key (unused vertex rows).
_SENTINEL = np.iinfo(np.int32).max
#: The packed key must stay below this (float32 product of the radices).
_PACK_LIMIT = 2.0 ** 30
#: Bucket sizes halve from the capacity while above twice this many
#: vertices, and there are at most this many buckets. Below a few 10k
#: vertices the blur costs little next to the splat and slice, and each
#: bucket is one more compiled copy of the filter (small images, as in tests
#: and CRF-RNN training crops, get one).
_MIN_BUCKET = 16384
_MAX_BUCKETS = 8
#: Vertices per iteration of the neighbour search.
_LINK_CHUNK = 4096


class Lattice(NamedTuple):
  """A permutohedral lattice built from ``N`` points with ``d`` features.

  ``M = N (d + 1)`` is the vertex capacity; vertices ``0 .. num_vertices-1``
  are used, in increasing key order.

  Attributes:
    offsets: ``[N, d+1]`` int32, the vertex of each (point, simplex corner).
    weights: ``[N, d+1]`` float, the barycentric weights (sum to one per row).
    neighbours: ``[d+1, 2, M]`` int32, the two blur neighbours of each vertex
      along each direction (``M`` where absent or for unused vertices).
    num_vertices: ``[]`` int32, the number of vertices actually used.
  """
  offsets: jax.Array
  weights: jax.Array
  neighbours: jax.Array
  num_vertices: jax.Array


def bucket_sizes(capacity: int) -> tuple[int, ...]:
  """The static vertex counts the blur is specialised for, ascending.

  Args:
    capacity: the lattice capacity ``N (d+1)``.

  Returns:
    sizes halving from ``capacity`` (the last, the largest, is ``capacity``).
  """
  sizes = [capacity]
  while len(sizes) < _MAX_BUCKETS and sizes[-1] > 2 * _MIN_BUCKET:
    sizes.append(-(-sizes[-1] // 2))
  return tuple(sizes[::-1])


def _bucket(num_vertices, sizes):
  """Index of the smallest size that holds ``max(num_vertices)``."""
  n = jnp.max(num_vertices)
  return sum((n > s).astype(jnp.int32) for s in sizes[:-1])


def _geometry(f):
  """Simplex corners and barycentric weights of ``f [N, d]`` (one image).

  Written per coordinate (``[N]`` vectors, ``d`` is static) in pydensecrf's
  operation order, so XLA fuses it into a few vectorised loops.

  Returns:
    ``(q [d, N, d+1] int32, weights [N, d+1])``: coordinate ``i`` of the key
    of corner ``r`` of point ``n`` is ``r + (d+1) q[i, n, r]``.
  """
  dtype = f.dtype
  d = f.shape[1]
  d1 = d + 1
  # pydensecrf: float inv_std_dev, scale in double, stored as float.
  inv_std_dev = float(np.float32(math.sqrt(2.0 / 3.0) * d1))
  scale = [inv_std_dev / math.sqrt((i + 2) * (i + 1)) for i in range(d)]
  down = jnp.asarray(np.float32(1.0 / d1), dtype)

  # Elevation y = E f (p.5 of Adams et al.), accumulated from the last one.
  elevated = [None] * d1
  sm = jnp.zeros(f.shape[:1], dtype)
  for j in range(d, 0, -1):
    cf = f[:, j - 1] * jnp.asarray(scale[j - 1], dtype)
    elevated[j] = sm - j * cf
    sm = sm + cf
  elevated[0] = sm

  # Nearest remainder-0 point (round half to even, as _mm_round_ps).
  v = [jnp.round(down * e) for e in elevated]
  coord_sum = sum(x.astype(jnp.int32) for x in v)
  delta = [e - x * d1 for e, x in zip(elevated, v)]
  # rank[i] = #{j > i: di < dj} + #{j < i: not dj < di}  (pydensecrf's loop).
  rank = []
  for i in range(d1):
    terms = [delta[i] < delta[j] for j in range(i + 1, d1)]
    terms += [~(delta[j] < delta[i]) for j in range(i)]
    rank.append(sum(t.astype(jnp.int32) for t in terms) + coord_sum)
  vi = []
  for i in range(d1):
    under, over = rank[i] < 0, rank[i] > d
    shift = under.astype(jnp.int32) - over.astype(jnp.int32)
    rank[i] = rank[i] + d1 * shift
    vi.append(v[i].astype(jnp.int32) + shift)

  u = [(e - (x * d1).astype(dtype)) * down for e, x in zip(elevated, vi)]
  # Materialise: XLA would otherwise fuse (and so recompute) the whole chain
  # above into every element of the larger outputs below.
  rank, u, vi = lax.optimization_barrier(
      (jnp.stack(rank), jnp.stack(u), jnp.stack(vi)))          # [d+1, N]

  # Barycentric coordinates (p.10): b[k] = u[k] - u[k-1] with u[k] the
  # scaled offset of the coordinate of rank d - k, b[0] += 1 + b[d+1].
  by_pos = []
  for k in range(d1):
    acc = jnp.zeros_like(u[0])
    for i in range(d1):
      acc = jnp.where(rank[i] == d - k, u[i], acc)
    by_pos.append(acc)
  weights = [by_pos[0] + (1.0 - by_pos[d])]
  weights += [by_pos[k] - by_pos[k - 1] for k in range(1, d1)]

  # Keys rem0[i] + canonical[r, rank[i]], canonical[r, k] = r if k <= d - r
  # else r - (d + 1); in units of d + 1 once r is removed.
  r = np.arange(d1, dtype=np.int32)
  q = vi[:d, :, None] - (rank[:d, :, None] > d - r).astype(jnp.int32)
  return q, jnp.stack(weights, axis=1)


def _lex_less(a, b):
  """``a < b`` lexicographically; ``a`` and ``b`` tuples of int32 columns."""
  out = a[-1] < b[-1]
  for x, y in zip(a[-2::-1], b[-2::-1]):
    out = (x < y) | ((x == y) & out)
  return out


def _search(table, queries):
  """Per query, the number of ``table`` rows below it.

  ``table`` and ``queries`` are tuples of int32 columns (lexicographic
  order, ``table`` sorted). Branchless binary lifting.
  """
  size = table[0].shape[0]
  top = size.bit_length() - 1

  def body(k, pos):
    step = jnp.left_shift(jnp.int32(1), (top - k).astype(jnp.int32))
    probe = pos + (step - 1)
    at = jnp.minimum(probe, size - 1)
    less = (probe < size) & _lex_less(tuple(t[at] for t in table), queries)
    return jnp.where(less, pos + step, pos)

  return lax.fori_loop(0, top + 1, body,
                       jnp.zeros(queries[0].shape, jnp.int32))


def _link_chunk(table, num_vertices, start, nb, neighbour_fn, chunk: int):
  """Blur neighbours of vertices ``start .. start+chunk-1`` into ``nb``."""
  cap = nb.shape[-1]
  verts = start + jnp.arange(chunk, dtype=jnp.int32)
  rows = tuple(lax.dynamic_slice(t, (start,), (chunk,)) for t in table)
  used = verts < num_vertices
  n1s = []
  for j, query in enumerate(neighbour_fn(rows)):
    i = _search(table, query)
    at = jnp.minimum(i, cap - 1)
    found = used & (i < num_vertices)
    for t, qc in zip(table, query):
      found &= t[at] == qc
    n1s.append(jnp.where(found, i, cap))
    # n2 is the inverse of n1 along the same direction.
    nb = nb.at[j, 1, jnp.where(found, i, cap)].set(verts, mode='drop')
  zero = jnp.zeros((), jnp.int32)
  return lax.dynamic_update_slice(nb, jnp.stack(n1s)[:, None],
                                  (zero, zero, start))


def _dedup(cols, neighbour_fn, cap: int):
  """Vertices of a batch of key columns (``tuple`` of ``[B, cap]`` int32).

  Returns:
    ``(offsets [B, cap], neighbours [B, d+1, 2, cap], num_vertices [B])``.
  """
  b = cols[0].shape[0]
  sorted_cols = lax.sort(cols, dimension=1, num_keys=len(cols))
  is_new = jnp.concatenate(
      [jnp.ones((b, 1), bool),
       functools.reduce(jnp.logical_or, [s[:, 1:] != s[:, :-1]
                                         for s in sorted_cols])], axis=1)
  ids = jnp.cumsum(is_new, axis=1, dtype=jnp.int32) - 1
  num_vertices = ids[:, -1] + 1
  target = jnp.where(is_new, ids, cap)
  table = tuple(jax.vmap(lambda s, t: jnp.full((cap,), _SENTINEL, jnp.int32)
                         .at[t].set(s, mode='drop'))(s, target)
                for s in sorted_cols)
  offsets = jax.vmap(_search)(table, cols)
  # Neighbours of the used vertices only, in chunks (a batch-wide trip
  # count, so this stays one loop under the batch's vmap).
  chunk = min(cap, _LINK_CHUNK)
  d1 = len(neighbour_fn(tuple(t[0, :1] for t in table)))
  link = jax.vmap(functools.partial(_link_chunk, neighbour_fn=neighbour_fn,
                                    chunk=chunk), in_axes=(0, 0, None, 0))

  def body(k, nb):
    start = jnp.minimum(k * chunk, cap - chunk).astype(jnp.int32)
    return link(table, num_vertices, start, nb)

  nb = lax.fori_loop(0, (jnp.max(num_vertices) + chunk - 1) // chunk, body,
                     jnp.full((b, d1, 2, cap), cap, jnp.int32))
  return offsets, nb, num_vertices


def _build(f) -> Lattice:
  """:func:`build_lattice` of a batch ``f [B, N, d]``."""
  dtype = f.dtype if jnp.issubdtype(f.dtype, jnp.floating) else jnp.float32
  f = f.astype(dtype)
  b, n, d = f.shape
  d1 = d + 1
  cap = n * d1
  q, weights = jax.vmap(_geometry)(f)                        # [B, d, N, d+1]
  r = jnp.broadcast_to(jnp.tile(jnp.arange(d1, dtype=jnp.int32), n), (b, cap))
  q = q.reshape(b, d, cap)
  # Batch-wide bounds, so the packing (and the cond) is one for the batch.
  qmin = jnp.min(q, axis=(0, 2))
  radix = jnp.max(q, axis=(0, 2)) - qmin + 3                 # spare digit each side
  fits = d1 * jnp.prod(radix.astype(jnp.float32)) < _PACK_LIMIT

  def packed(q, r):
    stride = jnp.concatenate(
        [jnp.ones((1,), jnp.int32), jnp.cumprod(radix[:-1], dtype=jnp.int32)])
    key = r + d1 * sum((q[:, i] - (qmin[i] - 1)) * stride[i] for i in range(d))
    # n1 along j: r >= 1 -> (r - 1, q + e_j); r = 0 -> (d, q - 1 + e_j).
    stride_j = jnp.concatenate([stride, jnp.zeros((1,), jnp.int32)])
    wrap = d - d1 * jnp.sum(stride) + 1

    def neighbours(table):
      (t,) = table
      base = t - 1 + jnp.where(t % d1 == 0, wrap, 0)
      return [(base + d1 * stride_j[j],) for j in range(d1)]

    return _dedup((key,), neighbours, cap)

  def lexicographic(q, r):
    def neighbours(table):
      *tq, tr = table
      low = tr == 0
      out = []
      for j in range(d1):
        cols = tuple(c + jnp.where(low, -1, 0) + (k == j) for k, c in
                     enumerate(tq))
        out.append(cols + (jnp.where(low, d, tr - 1),))
      return out

    return _dedup(tuple(q[:, i] for i in range(d)) + (r,), neighbours, cap)

  offsets, nb, num_vertices = lax.cond(fits, packed, lexicographic, q, r)
  return Lattice(offsets=offsets.reshape(b, n, d1), weights=weights,
                 neighbours=nb, num_vertices=num_vertices)


def build_lattice(features) -> Lattice:
  """Builds the lattice of one image (see :func:`build_lattice_batch`).

  Args:
    features: ``[N, d]`` bandwidth-scaled features (float32 or float64).

  Returns:
    a :class:`Lattice` with fixed-size arrays (capacity ``N (d+1)``).
  """
  features = jnp.asarray(features)
  if features.ndim != 2:
    raise ValueError(f'features must be [N, d], got shape {features.shape}')
  return jax.tree.map(lambda a: a[0], _build(features[None]))


def _apply(lat: Lattice, values, reverse: bool, size: int):
  """``alpha S^T B.. S values`` of one image, blur over ``size`` vertices."""
  n, d1 = lat.offsets.shape
  d = d1 - 1
  c = values.shape[-1]
  w = lat.weights.astype(values.dtype)
  off = lat.offsets

  # Splat one corner at a time: the [N, d+1, C] products never materialise.
  def splat_corner(r, acc):
    wr = lax.dynamic_index_in_dim(w, r, 1, keepdims=True)
    o = lax.dynamic_index_in_dim(off, r, 1, keepdims=False)
    return acc.at[o].add(wr * values, mode='drop')

  # Row ``size`` stays zero (its neighbours are itself): absent neighbours.
  grid = lax.fori_loop(0, d1, splat_corner,
                       jnp.zeros((size + 1, c), values.dtype))
  nb = jnp.minimum(lat.neighbours[:, :, :size], size)
  nb = jnp.concatenate([nb, jnp.full((d1, 2, 1), size, jnp.int32)], axis=2)
  half = jnp.asarray(0.5, values.dtype)

  # A loop, not unrolled: XLA would fuse unrolled passes into one another,
  # recomputing each earlier pass per gathered row.
  def blur(k, grid):
    j = d - k if reverse else k
    n1, n2 = nb[j, 0], nb[j, 1]
    return grid + half * (grid[n1] + grid[n2])

  grid = lax.fori_loop(0, d1, blur, grid)
  alpha = jnp.asarray(1.0 / (1.0 + 2.0 ** (-d)), values.dtype)
  sliced = sum(w[:, r:r + 1] * grid[off[:, r]] for r in range(d1))
  return alpha * sliced


def _apply_batch(lat: Lattice, values, reverse: bool, size: int):
  return jax.vmap(functools.partial(_apply, reverse=reverse, size=size))(
      lat, values)


def _zero_cotangent(x):
  if jnp.issubdtype(x.dtype, jnp.floating):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, dtype=jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _filter_sized(size, lat, values):
  return _apply_batch(lat, values, False, size)


def _fwd(size, lat, values):
  return _apply_batch(lat, values, False, size), lat


def _bwd(size, lat, g):
  return jax.tree.map(_zero_cotangent, lat), _apply_batch(lat, g, True, size)


_filter_sized.defvjp(_fwd, _bwd)


def _switch_filter(lat: Lattice, values, autodiff: bool = False):
  """Batched filter ``values [B, N, C]``, blur specialised to the bucket."""
  sizes = bucket_sizes(lat.neighbours.shape[-1])
  if autodiff:
    fns = [functools.partial(_apply_batch, reverse=False, size=s)
           for s in sizes]
  else:
    fns = [functools.partial(_filter_sized, s) for s in sizes]
  return lax.switch(_bucket(lat.num_vertices, sizes), fns, lat, values)


def lattice_filter(lat: Lattice, values):
  """Permutohedral Gaussian filter of ``values [N, C]`` (self term included).

  Approximates ``sum_j exp(-|f_i - f_j|^2 / 2) values_j`` exactly as
  pydensecrf's ``Permutohedral::compute`` does. Differentiable in ``values``
  via a custom VJP (the reversed lattice filter); no gradient reaches ``lat``.
  For a batch prefer :func:`lattice_filter_batch` to ``vmap`` (see the
  module docstring).
  """
  lat1 = jax.tree.map(lambda a: a[None], lat)
  return _switch_filter(lat1, values[None])[0]


def lattice_filter_batch(lat: Lattice, values):
  """:func:`lattice_filter` of a batch: ``lat`` and ``values [B, N, C]``."""
  return _switch_filter(lat, values)


def lattice_filter_autodiff(lat: Lattice, values):
  """:func:`lattice_filter` without the custom VJP (plain autodiff); a test aid."""
  lat1 = jax.tree.map(lambda a: a[None], lat)
  return _switch_filter(lat1, values[None], autodiff=True)[0]


def build_lattice_batch(features) -> Lattice:
  """Builds the lattices of ``[B, H, W, d]`` features (arrays get a ``B`` axis).

  Args:
    features: ``[B, H, W, d]`` bandwidth-scaled features.

  Returns:
    a :class:`Lattice` whose arrays have a leading batch axis.
  """
  b, h, w, d = features.shape
  return _build(jnp.asarray(features).reshape(b, h * w, d))


def permutohedral_filter(lat: Lattice, values, *, include_self: bool = True):
  """Batched lattice filter with flaxseg's filter interface.

  Args:
    lat: a lattice from :func:`build_lattice_batch`.
    values: ``[B, H, W, C]`` values.
    include_self: keep the ``j == i`` term (pydensecrf); ``False`` subtracts
      ``values_i`` from the lattice result (the exact self weight is 1).

  Returns:
    ``[B, H, W, C]`` filtered values.
  """
  b, h, w, c = values.shape
  out = _switch_filter(lat, values.reshape(b, h * w, c))
  out = out.reshape(b, h, w, c)
  return out if include_self else out - values
