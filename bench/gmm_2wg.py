"""Two-warpgroup grouped matmul (mas_jax/layers/gmm_hopper.py) against JAX's kernel and dense.

For lhs rows M in {8192, 32768} (tokens x top-2 routed to the device's experts), the expert
FFN's two matmuls (K, N) in {(4096, 16384), (16384, 4096)} and G in {1, 4, 16} groups with
uneven sizes (a random top-2 routing; one group empty at M=32768 for G=4 and 16), checks the new
kernel against `jax.lax.ragged_dot` (f32 accumulation) for transpose_rhs False and True, then
times, each as a chain of calls with no wait in between (median of 5 chains of 20 calls):
the new kernel, JAX's single-warpgroup `ragged_dot_mgpu.ragged_dot` (128, 128, 64, 4 steps,
grid_block_n 1) and a dense bf16 `jnp.dot` of [M, K] x [K, N]. TFLOP/s count 2*M*K*N.
A small tiling sweep of the new kernel (block_n, pipeline stages, grid_block_n, wgmma
release) at G=16 and the largest M (or --sweep_m) picks the tiling the table uses for each
(K, N).

  python bench/gmm_2wg.py --out DIR          # on an sm_90 GPU; writes DIR/gmm_2wg.{json,md}
  python bench/gmm_2wg.py --smoke --out DIR  # tiny shapes on CPU, kernels -> lax.ragged_dot
  python bench/gmm_2wg.py --render DIR/gmm_2wg.json  # rewrite the markdown, no measurement

With --kernel transposed it measures the weight-gradient kernel instead (DIR/tgmm_2wg.{json,md}):
checks of the two-warpgroup `gmm_hopper.transposed_ragged_dot` on small shapes with uneven,
empty and unaligned groups (part `check`), a tiling sweep of it and of JAX's
`transposed_ragged_dot_mgpu` at G=16 and the largest M (`sweep`), then for M in {8192, 16384},
(K, N) as above and G in {1, 4, 8, 16}: the new kernel (the sweep's best tiling), JAX's (the
tilings grouped_matmul ran it with) and a dense bf16 lhs^T @ rhs of the same M, K, N (`table`),
every kernel output checked against per-group dots with f32 accumulation.

docs/benchmarks/gmm_2wg.{json,md} (H100) came from an earlier revision of this script whose
sweep ran at the last shape of the --big_first order, M=8192: today that run is
`python bench/gmm_2wg.py --out DIR --big_first --sweep_m 8192` (--merge_from took no rows).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mas_jax.layers import gmm_hopper  # noqa: E402

DEFAULT_TILING = dict(
  block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1, delay_release=0
)
MGPU_TILING = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)


def sweep_tilings(smoke: bool, extra: bool = False) -> list[dict]:
  """Tilings of the new kernel to try (shared memory: 4 stages of a 128 x 256 tile fit)."""
  if smoke:
    return [DEFAULT_TILING, dict(DEFAULT_TILING, block_n=64, grid_block_n=4)]
  # (block_m, block_n, steps, grid_block_n, delay_release); the sweep may be cut short by
  # --budget_s. Shared memory: 4 stages of a 128 x 256 tile fit, 5 of 64 x 256. The block_m=64
  # tilings (--sweep_extra) lower and fit but were never timed.
  picks = [
    (128, 128, 4, 8, 0),
    (128, 128, 4, 8, 1),
    (128, 128, 4, 16, 0),
    (128, 128, 4, 4, 0),
    (128, 128, 4, 1, 0),
    (128, 128, 4, 16, 1),
    (128, 128, 4, 4, 1),
    (128, 128, 4, 1, 1),
    (128, 128, 3, 8, 0),
    (128, 64, 5, 8, 0),
    (128, 64, 5, 8, 1),
  ]
  if extra:
    picks += [(64, 128, 5, 8, 1), (64, 128, 5, 4, 1), (64, 128, 5, 8, 0), (128, 128, 3, 4, 1)]
  out = [
    dict(
      block_m=bm,
      block_n=bn,
      block_k=64,
      max_concurrent_steps=st,
      grid_block_n=gbn,
      delay_release=dr,
    )
    for bm, bn, st, gbn, dr in picks
  ]
  return out


def routed_group_sizes(m: int, g: int, seed: int, empty: bool) -> np.ndarray:
  """Rows per expert from a random top-2 routing of m // 2 tokens over g skewed experts."""
  rng = np.random.default_rng(seed)
  if g == 1:
    return np.array([m], np.int32)
  tokens = m // 2
  bias = rng.normal(0.0, 0.5, g)
  logits = rng.normal(0.0, 1.0, (tokens, g)) + bias
  if empty:
    logits[:, g // 2] = -np.inf  # No token picks this expert.
  top2 = np.argsort(-logits, axis=1)[:, :2]
  sizes = np.bincount(top2.ravel(), minlength=g).astype(np.int32)
  sizes[-1] += m - sizes.sum()
  assert sizes.sum() == m and (sizes >= 0).all()
  return sizes


def shapes(smoke: bool) -> list[dict]:
  if smoke:
    ms, kns, gs = (96,), ((64, 128), (128, 64)), (1, 3)
  else:
    ms, kns, gs = (8192, 32768), ((4096, 16384), (16384, 4096)), (1, 4, 16)
  out = []
  for m in ms:
    for k, n in kns:
      for g in gs:
        empty = g >= 3 and m == ms[-1]
        sizes = routed_group_sizes(m, g, seed=m + k + g, empty=empty)
        out.append(dict(m=m, k=k, n=n, g=g, group_sizes=sizes.tolist()))
  return out


def reference_fn(lhs, rhs, group_sizes, *, transpose_rhs=False, **_):
  """lax.ragged_dot with the kernels' signature (tiling ignored): the CPU stand-in."""
  if transpose_rhs:
    rhs = jnp.swapaxes(rhs, 1, 2)
  return jax.lax.ragged_dot(lhs, rhs, group_sizes).astype(lhs.dtype)


def reference(lhs, rhs, group_sizes: list[int], max_bytes: int = 9 << 30):
  """(f32 result, name): `lax.ragged_dot` with f32 accumulation where XLA's lowering (dense per
  group) stays under 9 GiB (M*G*N f32), else the same sums as a loop over groups of a dense
  f32-accumulated dot kept on the group's rows (bf16 products are exact in f32 either way)."""
  m, n, g = lhs.shape[0], rhs.shape[2], rhs.shape[0]
  sizes = jnp.asarray(np.array(group_sizes, np.int32))
  if m * n * g * 4 <= max_bytes:
    f = jax.jit(lambda a, b, s: jax.lax.ragged_dot(a, b, s, preferred_element_type=jnp.float32))
    return f(lhs, rhs, sizes), 'lax.ragged_dot'

  @jax.jit
  def masked(a, b, s):
    ends = jnp.cumsum(s)
    starts = ends - s
    rows = jnp.arange(m)[:, None]

    def body(i, acc):
      y = jnp.dot(a, b[i], preferred_element_type=jnp.float32)
      return jnp.where((rows >= starts[i]) & (rows < ends[i]), y, acc)

    return jax.lax.fori_loop(0, g, body, jnp.zeros((m, n), jnp.float32))

  return masked(lhs, rhs, sizes), 'per-group dense dot, masked'


def kernels(smoke: bool):
  """(new, jax_mgpu) callables with ragged_dot_mgpu's signature."""
  if smoke:
    return reference_fn, reference_fn

  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

  def new(lhs, rhs, group_sizes, **kw):
    return gmm_hopper.ragged_dot(lhs, rhs, group_sizes=group_sizes, **kw)

  def mgpu(lhs, rhs, group_sizes, **kw):
    return ragged_dot_mgpu.ragged_dot(lhs, rhs, group_sizes=group_sizes, **kw)

  return new, mgpu


def chain_time(fn, args, calls: int, chains: int) -> float:
  """Seconds per call: median over `chains` chains of `calls` back-to-back calls, / calls."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(chains):
    start = time.perf_counter()
    out = None
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / calls)
  return statistics.median(times)


def make_inputs(shape: dict, seed: int):
  m, k, n, g = shape['m'], shape['k'], shape['n'], shape['g']
  k1, k2 = jax.random.split(jax.random.key(seed))
  lhs = jax.random.normal(k1, (m, k), jnp.bfloat16)
  rhs = (jax.random.normal(k2, (g, k, n), jnp.float32) / np.sqrt(k)).astype(jnp.bfloat16)
  sizes = jnp.asarray(np.array(shape['group_sizes'], np.int32))
  return lhs, rhs, sizes


@jax.jit
def _err_stats(out, ref):
  o = out.astype(jnp.float32)
  d = jnp.abs(o - ref)
  return (
    jnp.isfinite(o).all(),
    d.max(),
    jnp.abs(ref).max(),
    jnp.sqrt(jnp.sum(d * d)),
    jnp.sqrt(jnp.sum(ref * ref)),
  )


def rel_errors(out, ref) -> dict:
  """max |out - ref| / max |ref| and ||out - ref|| / ||ref|| (computed on the device)."""
  finite, dmax, rmax, dnorm, rnorm = (np.asarray(x) for x in _err_stats(out, ref))
  if not finite:
    return dict(finite=False, max_rel=float('inf'), norm_rel=float('inf'))
  return dict(
    finite=True,
    max_rel=float(dmax / max(float(rmax), 1e-30)),
    norm_rel=float(dnorm / max(float(rnorm), 1e-30)),
  )


def tiling_str(t: dict) -> str:
  keys = ('block_m', 'block_n', 'block_k', 'max_concurrent_steps', 'grid_block_n', 'delay_release')
  return ','.join(str(t[k]) for k in keys if k in t)


def run(args) -> dict:
  t0 = time.perf_counter()
  new_fn, mgpu_fn = kernels(args.smoke)
  calls, chains = (2, 2) if args.smoke else (args.calls, args.chains)
  result = dict(
    command='python bench/gmm_2wg.py ' + ' '.join(args.argv),
    device=str(jax.devices()[0].device_kind),
    jax_version=jax.__version__,
    timing=f'median of {chains} chains of {calls} back-to-back calls, per call',
    checks=[],
    sweep=[],
    table=[],
    errors=[],
  )
  all_shapes = shapes(args.smoke)
  if args.big_first:
    all_shapes.sort(key=lambda sh: -sh['m'])
  best_by_kn: dict = {}
  if args.best_from:
    with open(args.best_from) as f:
      prior = json.load(f)
    result['sweep'] = prior.get('sweep', [])
    for key, v in prior.get('best_tiling', {}).items():
      k, n = (int(x) for x in key.split('x'))
      best_by_kn[(k, n)] = (v['tflops'], v['tiling'])
    result['best_from'] = args.best_from

  def save_partial():
    with open(os.path.join(args.out, 'gmm_2wg.json'), 'w') as f:
      json.dump(result, f, indent=1)

  def over_budget():
    return time.perf_counter() - t0 > args.budget_s

  def jit_kernel(fn, tiling, transpose):
    return jax.jit(lambda a, b, s: fn(a, b, s, transpose_rhs=transpose, **tiling))

  # 1. Sweep (new kernel only, transpose_rhs=False) at the largest M and G for each (K, N).
  def do_sweep():
    result['sweep_tilings_tried'] = len(sweep_tilings(args.smoke, args.sweep_extra))
    for shape in all_shapes:
      if shape['m'] != (args.sweep_m or max(sh['m'] for sh in all_shapes)):
        continue
      if shape['g'] != max(sh['g'] for sh in all_shapes):
        continue
      lhs, rhs, sizes = make_inputs(shape, seed=1)
      ref = None
      flops = 2 * shape['m'] * shape['k'] * shape['n']
      for tiling in sweep_tilings(args.smoke, args.sweep_extra)[: args.sweep_max or None]:
        if over_budget():
          result['errors'].append('sweep cut short by --budget_s')
          break
        row = dict(
          m=shape['m'], k=shape['k'], n=shape['n'], g=shape['g'], tiling=tiling_str(tiling)
        )
        try:
          f = jit_kernel(new_fn, tiling, False)
          out = f(lhs, rhs, sizes)
          if ref is None:
            ref, _ = reference(lhs, rhs, shape['group_sizes'])
          row.update(rel_errors(out, ref))
          if row['max_rel'] > 2e-2:
            row['error'] = 'wrong result'
          else:
            s = chain_time(f, (lhs, rhs, sizes), calls, chains)
            row.update(ms=s * 1e3, tflops=flops / s / 1e12)
        except Exception as e:  # noqa: BLE001
          row['error'] = f'{type(e).__name__}: {str(e)[:300]}'
        row['elapsed_s'] = time.perf_counter() - t0
        result['sweep'].append(row)
        save_partial()
        print('sweep', row, flush=True)
        key = (shape['k'], shape['n'])
        if 'tflops' in row and row['tflops'] > best_by_kn.get(key, (0, None))[0]:
          best_by_kn[key] = (row['tflops'], tiling)
      del lhs, rhs, ref
    result['best_tiling'] = {
      f'{k}x{n}': dict(tflops=v[0], tiling=v[1]) for (k, n), v in best_by_kn.items()
    }

  # 2. Checks (both transposes) and timings of every shape.
  def do_table():
    for shape in all_shapes[: args.max_shapes or None]:
      if args.only_g and shape['g'] != args.only_g:
        continue
      if over_budget():
        result['errors'].append('table cut short by --budget_s')
        break
      m, k, n, g = shape['m'], shape['k'], shape['n'], shape['g']
      tiling = best_by_kn.get((k, n), (0, DEFAULT_TILING))[1]
      lhs, rhs, sizes = make_inputs(shape, seed=2)
      rhs_t = jnp.swapaxes(rhs, 1, 2).copy()
      ref, ref_name = reference(lhs, rhs, shape['group_sizes'])
      flops = 2 * m * k * n
      row = dict(
        m=m,
        k=k,
        n=n,
        g=g,
        group_sizes=shape['group_sizes'],
        tiling=tiling_str(tiling),
        reference=ref_name,
      )
      for name, fn, til in (('new', new_fn, tiling), ('mgpu', mgpu_fn, MGPU_TILING)):
        for transpose, w in ((False, rhs), (True, rhs_t)):
          tag = f'{name}_{"t" if transpose else "n"}'
          try:
            f = jit_kernel(fn, til, transpose)
            err = rel_errors(f(lhs, w, sizes), ref)
            result['checks'].append(
              dict(m=m, k=k, n=n, g=g, kernel=name, transpose_rhs=transpose, **err)
            )
            row[f'{tag}_max_rel'] = err['max_rel']
            s = chain_time(f, (lhs, w, sizes), calls, chains)
            row[f'{tag}_ms'] = s * 1e3
            row[f'{tag}_tflops'] = flops / s / 1e12
          except Exception as e:  # noqa: BLE001
            row[f'{tag}_error'] = f'{type(e).__name__}: {str(e)[:300]}'
            if args.verbose:
              traceback.print_exc()
      dense = jax.jit(lambda a, b: jnp.dot(a, b))
      s = chain_time(dense, (lhs, rhs[0]), calls, chains)
      row['dense_ms'] = s * 1e3
      row['dense_tflops'] = flops / s / 1e12
      for tag in ('new_n', 'new_t', 'mgpu_n', 'mgpu_t'):
        if f'{tag}_tflops' in row:
          row[f'{tag}_vs_dense'] = row[f'{tag}_tflops'] / row['dense_tflops']
      row['elapsed_s'] = time.perf_counter() - t0
      result['table'].append(row)
      save_partial()
      print('table', {kk: v for kk, v in row.items() if kk != 'group_sizes'}, flush=True)
      del lhs, rhs, rhs_t, ref

  for part in args.parts.split(','):
    {'sweep': do_sweep, 'table': do_table}[part]()
  if args.merge_from:
    with open(args.merge_from) as f:
      prior = json.load(f)
    done = {(r['m'], r['k'], r['n'], r['g']) for r in result['table']}
    for r in prior.get('table', []):
      if (r['m'], r['k'], r['n'], r['g']) not in done:
        result['table'].append(dict(r, from_run=args.merge_from))
    result['sweep'] += [dict(r, from_run=args.merge_from) for r in prior.get('sweep', [])]
    result['checks'] += [
      c for c in prior.get('checks', []) if (c['m'], c['k'], c['n'], c['g']) not in done
    ]
    key = lambda r: (r['m'], r['k'], r['n'], r['g'])
    result['table'].sort(key=key)
    result['merged_from'] = args.merge_from
  result['wall_s'] = time.perf_counter() - t0
  return result


# ---- The transposed kernel (the weight gradient): --kernel transposed ----

# JAX's transposed kernel with the tilings grouped_matmul ran it with (bench/grouped_matmul.py's
# sweep, docs/benchmarks/nvidia_h100_80gb_hbm3_grouped_matmul.md); other (K, N): the first.
JAX_T_TILINGS = {
  (4096, 16384): dict(block_m=64, block_n=256, block_k=64, max_concurrent_steps=4, grid_block_n=1),
  (16384, 4096): dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=8),
}
T_DEFAULT = dict(
  block_m=64,
  block_n=256,
  block_k=64,
  max_concurrent_steps=4,
  grid_block_n=1,
  wg_dim='m',
  epi_slots=2,
)


def t_sweep_tilings(smoke: bool) -> list[tuple[str, dict]]:
  """(kernel, tiling) pairs of the transposed sweep: the new kernel's, then a few of JAX's."""
  if smoke:
    return [('new', T_DEFAULT), ('new', dict(T_DEFAULT, wg_dim='n', block_m=128, block_n=64))]
  # (block_m, block_n, block_k, steps, grid_block_n, wg_dim, epi_slots): all fit in shared
  # memory (a CTA tile of 128 x 256 with 4 stages of 64 rows and 2 epilogue slots per
  # warpgroup, or 3 stages and 4 slots, or 3 stages with 128 x 128 warpgroup tiles; 5 stages
  # of a 128 x 128 CTA tile; 2 stages of 128 rows).
  picks = [
    (64, 256, 64, 4, 1, 'm', 2),
    (64, 256, 64, 4, 8, 'm', 2),
    (64, 256, 64, 3, 1, 'm', 4),
    (64, 256, 64, 3, 8, 'm', 4),
    (64, 256, 64, 4, 2, 'm', 2),
    (64, 256, 64, 3, 1, 'm', 2),
    (128, 128, 64, 3, 1, 'n', 2),
    (128, 128, 64, 3, 1, 'm', 2),
    (64, 128, 64, 5, 1, 'm', 2),
    (64, 256, 128, 2, 1, 'm', 2),
    (64, 128, 64, 4, 1, 'n', 2),
  ]
  keys = ('block_m', 'block_n', 'block_k', 'max_concurrent_steps', 'grid_block_n')
  out = [('new', dict(zip(keys + ('wg_dim', 'epi_slots'), p, strict=True))) for p in picks]
  for p in ((64, 256, 64, 4, 1), (128, 128, 64, 4, 8), (64, 256, 64, 4, 8)):
    out.append(('jax', dict(zip(keys, p, strict=True))))
  return out


def t_shapes(smoke: bool) -> list[dict]:
  if smoke:
    ms, kns, gs = (96,), ((128, 256), (256, 128)), (1, 3)
  else:
    ms, kns, gs = (8192, 16384), ((4096, 16384), (16384, 4096)), (1, 4, 8, 16)
  out = []
  for m in ms:
    for k, n in kns:
      for g in gs:
        empty = g >= 3 and m == ms[-1]
        sizes = routed_group_sizes(m, g, seed=m + k + g, empty=empty)
        out.append(dict(m=m, k=k, n=n, g=g, group_sizes=sizes.tolist()))
  return out


def t_check_cases(smoke: bool) -> list[dict]:
  """Small shapes with uneven, empty and unaligned groups (sizes may sum to less than M)."""
  k, n = (128, 256) if smoke else (256, 512)
  cases = [
    (1000, [300, 0, 129, 1, 570]),  # M no multiple of 64; a 1-row group, an empty one.
    (1024, [0, 512, 512, 0]),  # Empty first and last groups; boundaries on block edges.
    (64, [64]),
    (200, [0, 0, 200]),
    (1000, [100, 200]),  # Rows 300.. belong to no group.
  ]
  return [dict(m=m, k=k, n=n, g=len(s), group_sizes=s) for m, s in cases]


def t_reference_fn(lhs, rhs, group_sizes, **_):
  """Per-group lhs_g^T @ rhs_g as a loop of masked dots (tiling ignored): the CPU stand-in."""
  ends = jnp.cumsum(group_sizes)
  rows = jnp.arange(lhs.shape[0])

  def one(start, end):
    a = jnp.where(((rows >= start) & (rows < end))[:, None], lhs, 0)
    return jax.lax.dot_general(a, rhs, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

  return jax.lax.map(lambda se: one(*se), (ends - group_sizes, ends)).astype(lhs.dtype)


def t_kernels(smoke: bool):
  """(new, jax) callables with the transposed kernels' signature."""
  if smoke:
    return t_reference_fn, t_reference_fn
  from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu

  def new(lhs, rhs, group_sizes, **kw):
    return gmm_hopper.transposed_ragged_dot(lhs, rhs, group_sizes=group_sizes, **kw)

  def jax_t(lhs, rhs, group_sizes, **kw):
    return transposed_ragged_dot_mgpu.transposed_ragged_dot(lhs, rhs, group_sizes=group_sizes, **kw)

  return new, jax_t


@jax.jit
def _t_err_stats(out, lhs, rhs, sizes):
  """Against per-group dots with f32 accumulation: (finite, max |d|, max |ref|, ||d||, ||ref||,
  max |out| over empty groups), one group at a time (no [G, K, N] f32 copy)."""
  ends = jnp.cumsum(sizes)
  starts = ends - sizes
  rows = jnp.arange(lhs.shape[0])

  def body(i, c):
    finite, dmax, rmax, d2, r2, emax = c
    a = jnp.where(((rows >= starts[i]) & (rows < ends[i]))[:, None], lhs, 0)
    ref = jax.lax.dot_general(a, rhs, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    o = out[i].astype(jnp.float32)
    d = jnp.abs(o - ref)
    return (
      finite & jnp.isfinite(o).all(),
      jnp.maximum(dmax, d.max()),
      jnp.maximum(rmax, jnp.abs(ref).max()),
      d2 + jnp.sum(d * d),
      r2 + jnp.sum(ref * ref),
      jnp.maximum(emax, jnp.where(sizes[i] == 0, jnp.abs(o).max(), 0.0)),
    )

  z = jnp.float32(0)
  return jax.lax.fori_loop(0, sizes.shape[0], body, (jnp.bool_(True), z, z, z, z, z))


def t_rel_errors(out, lhs, rhs, sizes) -> dict:
  finite, dmax, rmax, d2, r2, emax = (np.asarray(x) for x in _t_err_stats(out, lhs, rhs, sizes))
  if not finite:
    return dict(finite=False, max_rel=float('inf'), norm_rel=float('inf'), empty_max=None)
  return dict(
    finite=True,
    max_rel=float(dmax / max(float(rmax), 1e-30)),
    norm_rel=float(np.sqrt(d2) / max(float(np.sqrt(r2)), 1e-30)),
    empty_max=float(emax),
  )


def t_inputs(shape: dict, seed: int):
  m, k, n = shape['m'], shape['k'], shape['n']
  k1, k2 = jax.random.split(jax.random.key(seed))
  lhs = jax.random.normal(k1, (m, k), jnp.bfloat16)
  rhs = jax.random.normal(k2, (m, n), jnp.bfloat16)
  return lhs, rhs, jnp.asarray(np.array(shape['group_sizes'], np.int32))


def t_checked_call(f, lhs, rhs, sizes, out_shape) -> tuple:
  """(output, errors): the call runs right after a NaN-filled buffer of its output's shape is
  freed (the allocator hands that memory out again), so an unwritten element shows as NaN."""
  jax.block_until_ready(jnp.full(out_shape, jnp.nan, lhs.dtype)).delete()
  out = f(lhs, rhs, sizes)
  return out, t_rel_errors(out, lhs, rhs, sizes)


def t_tiling_str(t: dict) -> str:
  keys = (
    'block_m',
    'block_n',
    'block_k',
    'max_concurrent_steps',
    'grid_block_n',
    'wg_dim',
    'epi_slots',
  )
  return ','.join(str(t[k]) for k in keys if k in t)


def run_transposed(args) -> dict:
  t0 = time.perf_counter()
  new_fn, jax_fn = t_kernels(args.smoke)
  fns = dict(new=new_fn, jax=jax_fn)
  calls, chains = (2, 2) if args.smoke else (args.calls, args.chains)
  result = dict(
    kernel='transposed',
    command='python bench/gmm_2wg.py ' + ' '.join(args.argv),
    device=str(jax.devices()[0].device_kind),
    jax_version=jax.__version__,
    timing=f'median of {chains} chains of {calls} back-to-back calls, per call',
    checks=[],
    sweep=[],
    table=[],
    errors=[],
  )
  path = os.path.join(args.out, 'tgmm_2wg.json')

  def save_partial():
    with open(path, 'w') as f:
      json.dump(result, f, indent=1)

  def over_budget():
    return time.perf_counter() - t0 > args.budget_s

  def jitted(name, tiling):
    fn = fns[name]
    return jax.jit(lambda a, b, s: fn(a, b, s, **tiling))

  def measure(row, tag, name, tiling, lhs, rhs, sizes, flops):
    """Checks and times one kernel; fills row[tag_*]."""
    try:
      f = jitted(name, tiling)
      out_shape = (sizes.shape[0], lhs.shape[1], rhs.shape[1])
      _, err = t_checked_call(f, lhs, rhs, sizes, out_shape)
      row[f'{tag}_max_rel'] = err['max_rel']
      row[f'{tag}_empty_max'] = err['empty_max']
      if not err['max_rel'] < 2e-2:
        row[f'{tag}_error'] = 'wrong result'
        return
      s = chain_time(f, (lhs, rhs, sizes), calls, chains)
      row[f'{tag}_ms'] = s * 1e3
      row[f'{tag}_tflops'] = flops / s / 1e12
    except Exception as e:  # noqa: BLE001
      row[f'{tag}_error'] = f'{type(e).__name__}: {str(e)[:300]}'
      if args.verbose:
        traceback.print_exc()

  def do_check():
    # The default, and the tilings with wg_dim='n' or with 128-row steps.
    tilings = [T_DEFAULT]
    for kname, t in t_sweep_tilings(args.smoke):
      if (
        kname == 'new'
        and t not in tilings
        and (args.smoke or t['wg_dim'] == 'n' or t['block_k'] == 128 or t['epi_slots'] != 2)
      ):
        tilings.append(t)
    for shape in t_check_cases(args.smoke):
      lhs, rhs, sizes = t_inputs(shape, seed=3)
      for tiling in tilings[: args.check_max or None]:
        row = dict(shape, tiling=t_tiling_str(tiling))
        try:
          _, err = t_checked_call(
            jitted('new', tiling),
            lhs,
            rhs,
            sizes,
            (shape['g'],)
            + (
              shape['k'],
              shape['n'],
            ),
          )
          row.update(err)
        except Exception as e:  # noqa: BLE001
          row['error'] = f'{type(e).__name__}: {str(e)[:300]}'
          if args.verbose:
            traceback.print_exc()
        result['checks'].append(row)
        print('check', row, flush=True)
      save_partial()

  best: dict = {}

  def do_sweep():
    for shape in t_shapes(args.smoke):
      if shape['m'] != (args.sweep_m or max(sh['m'] for sh in t_shapes(args.smoke))):
        continue
      if shape['g'] != max(sh['g'] for sh in t_shapes(args.smoke)):
        continue
      lhs, rhs, sizes = t_inputs(shape, seed=1)
      flops = 2 * shape['m'] * shape['k'] * shape['n']
      for name, tiling in t_sweep_tilings(args.smoke)[: args.sweep_max or None]:
        if over_budget():
          result['errors'].append('sweep cut short by --budget_s')
          break
        row = dict(
          m=shape['m'],
          k=shape['k'],
          n=shape['n'],
          g=shape['g'],
          kernel=name,
          tiling=t_tiling_str(tiling),
        )
        measure(row, 'r', name, tiling, lhs, rhs, sizes, flops)
        row = {kk.removeprefix('r_'): v for kk, v in row.items()}
        row['elapsed_s'] = time.perf_counter() - t0
        result['sweep'].append(row)
        save_partial()
        print('sweep', row, flush=True)
        key = (name, shape['k'], shape['n'])
        if 'tflops' in row and row['tflops'] > best.get(key, (0, None))[0]:
          best[key] = (row['tflops'], tiling)
      del lhs, rhs
    result['best_tiling'] = {
      f'{name}:{k}x{n}': dict(tflops=v[0], tiling=v[1]) for (name, k, n), v in best.items()
    }

  def do_table():
    for shape in t_shapes(args.smoke):
      if args.only_g and shape['g'] != args.only_g:
        continue
      if over_budget():
        result['errors'].append('table cut short by --budget_s')
        break
      m, k, n, g = shape['m'], shape['k'], shape['n'], shape['g']
      tilings = dict(
        new=best.get(('new', k, n), (0, T_DEFAULT))[1],
        jax=JAX_T_TILINGS.get((k, n), next(iter(JAX_T_TILINGS.values()))),
      )
      lhs, rhs, sizes = t_inputs(shape, seed=2)
      flops = 2 * m * k * n
      row = dict(
        m=m,
        k=k,
        n=n,
        g=g,
        group_sizes=shape['group_sizes'],
        new_tiling=t_tiling_str(tilings['new']),
        jax_tiling=t_tiling_str(tilings['jax']),
      )
      for name in ('new', 'jax'):
        measure(row, name, name, tilings[name], lhs, rhs, sizes, flops)
      dense = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((0,), (0,)), ((), ()))))
      s = chain_time(dense, (lhs, rhs), calls, chains)
      row['dense_ms'] = s * 1e3
      row['dense_tflops'] = flops / s / 1e12
      for name in ('new', 'jax'):
        if f'{name}_tflops' in row:
          row[f'{name}_vs_dense'] = row[f'{name}_tflops'] / row['dense_tflops']
      if 'new_ms' in row and 'jax_ms' in row:
        row['new_speedup'] = row['jax_ms'] / row['new_ms']
      row['elapsed_s'] = time.perf_counter() - t0
      result['table'].append(row)
      save_partial()
      print('table', {kk: v for kk, v in row.items() if kk != 'group_sizes'}, flush=True)
      del lhs, rhs

  for part in args.parts.split(','):
    bad = [c for c in result['checks'] if 'error' in c or not c['max_rel'] < 2e-2]
    if bad and args.stop_on_fail:
      result['errors'].append(f'{len(bad)} failed checks: stopped before {part}')
      break
    {'check': do_check, 'sweep': do_sweep, 'table': do_table}[part]()
  result['wall_s'] = time.perf_counter() - t0
  return result


def t_markdown(result: dict) -> str:
  lines = [
    f'# Two-warpgroup transposed grouped matmul on {result["device"]}, JAX {result["jax_version"]}',
    '',
    f'Command: `{result["command"]}`. Timing: {result["timing"]}. Per group g, out[g] = '
    'lhs_g^T @ rhs_g (lhs [M, K], rhs [M, N], out [G, K, N], the weight gradient); TFLOP/s = '
    '2*M*K*N / time. new = gmm_hopper.transposed_ragged_dot (2 compute warpgroups; tiling '
    "m,n,k,steps,gbn,wg_dim,epi_slots with block_m/block_n one warpgroup's tile), jax = JAX's "
    'transposed_ragged_dot_mgpu (tiling m,n,k,steps,gbn), dense = one bf16 lhs^T @ rhs of the '
    'same M, K, N (XLA). err = max |out-ref| / max |ref| against per-group dots with f32 '
    'accumulation, the call run over memory just filled with NaN; empty = max |out| of the '
    'empty groups.',
    '',
    '| M | K | N | G | new tiling | new ms | new TF/s | jax ms | jax TF/s | dense ms '
    '| dense TF/s | new/jax speed | new/dense | jax/dense | err new | err jax | empty new |',
    '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in result['table']:
    lines.append(
      f'| {r["m"]} | {r["k"]} | {r["n"]} | {r["g"]} | {r["new_tiling"]} '
      f'| {fmt(r.get("new_ms"), ".3f")} | {fmt(r.get("new_tflops"))} '
      f'| {fmt(r.get("jax_ms"), ".3f")} | {fmt(r.get("jax_tflops"))} '
      f'| {fmt(r.get("dense_ms"), ".3f")} | {fmt(r.get("dense_tflops"))} '
      f'| {fmt(r.get("new_speedup"), ".2f")} | {fmt(r.get("new_vs_dense"), ".0%")} '
      f'| {fmt(r.get("jax_vs_dense"), ".0%")} | {fmt(r.get("new_max_rel"), ".1e")} '
      f'| {fmt(r.get("jax_max_rel"), ".1e")} '
      f'| {fmt(r.get("new_empty_max"), ".0f") if r["g"] > 1 and 0 in r["group_sizes"] else "-"} |'
    )
  errs = [(r, kk, v) for r in result['table'] for kk, v in r.items() if kk.endswith('_error')]
  if errs:
    lines += ['', 'Errors:', '']
    lines += [f'- M={r["m"]} K={r["k"]} N={r["n"]} G={r["g"]} {kk}: {v}' for r, kk, v in errs]
  if result['sweep']:
    lines += [
      '',
      '## Tiling sweep',
      '',
      '| M | K | N | G | kernel | tiling | ms | TFLOP/s | max err | error |',
      '|---|---|---|---|---|---|---|---|---|---|',
    ]
    for r in result['sweep']:
      lines.append(
        f'| {r["m"]} | {r["k"]} | {r["n"]} | {r["g"]} | {r["kernel"]} | {r["tiling"]} '
        f'| {fmt(r.get("ms"), ".3f")} | {fmt(r.get("tflops"))} | {fmt(r.get("max_rel"), ".1e")} '
        f'| {r.get("error", "")[:120]} |'
      )
  if result['checks']:
    lines += [
      '',
      '## Checks of the new kernel on small shapes (uneven, empty and unaligned groups)',
      '',
      '| M | K | N | group sizes | tiling | max err | norm err | max abs of empty groups | error |',
      '|---|---|---|---|---|---|---|---|---|',
    ]
    for r in result['checks']:
      lines.append(
        f'| {r["m"]} | {r["k"]} | {r["n"]} | {r["group_sizes"]} | {r["tiling"]} '
        f'| {fmt(r.get("max_rel"), ".1e")} | {fmt(r.get("norm_rel"), ".1e")} '
        f'| {fmt(r.get("empty_max"), "g")} | {r.get("error", "")[:120]} |'
      )
  return '\n'.join(lines + _notes_and_groups(result)) + '\n'


def _notes_and_groups(result: dict) -> list[str]:
  """The markdown's closing lines: the run's notes and the routed group sizes of the table."""
  lines = ['', 'Notes: ' + '; '.join(result['errors'])] if result['errors'] else []
  groups = [
    f'M={r["m"]} G={r["g"]}: {r["group_sizes"]}'
    for r in result['table']
    if r['g'] > 1 and r['k'] == result['table'][0]['k']
  ]
  if groups:
    lines += ['', 'Group sizes (random top-2 routing):', ''] + [f'- {s}' for s in groups]
  return lines


def fmt(x, spec='.0f'):
  return '-' if x is None else format(x, spec)


def markdown(result: dict) -> str:
  lines = [
    f'# Two-warpgroup grouped matmul on {result["device"]}, JAX {result["jax_version"]}',
    '',
    f'Command: `{result["command"]}`. Timing: {result["timing"]}. TFLOP/s = 2*M*K*N / time; '
    'new = mas_jax/layers/gmm_hopper.py (2 compute warpgroups, CTA tile block_m x 2*block_n), '
    'mgpu = jax ragged_dot_mgpu (128,128,64, 4 steps, grid_block_n 1), dense = jnp.dot '
    '[M,K]x[K,N] bf16. _n: rhs [G,K,N]; _t: transpose_rhs (rhs [G,N,K]). '
    'err = max |out-ref| / max |ref| against lax.ragged_dot with f32 accumulation (where that '
    'would need over 9 GiB: a masked per-group dot with f32 accumulation; JSON field reference).',
    '',
    '| M | K | N | G | tiling (m,n,k,steps,gbn,dr) | new_n TF/s | new_t TF/s | mgpu_n TF/s '
    '| mgpu_t TF/s | dense TF/s | new_n/dense | new_t/dense | mgpu_n/dense | max err new '
    '| max err mgpu |',
    '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in result['table']:
    err_new = max([r.get('new_n_max_rel', float('nan')), r.get('new_t_max_rel', float('nan'))])
    err_mg = max([r.get('mgpu_n_max_rel', float('nan')), r.get('mgpu_t_max_rel', float('nan'))])
    lines.append(
      f'| {r["m"]} | {r["k"]} | {r["n"]} | {r["g"]} | {r["tiling"]} '
      f'| {fmt(r.get("new_n_tflops"))} | {fmt(r.get("new_t_tflops"))} '
      f'| {fmt(r.get("mgpu_n_tflops"))} | {fmt(r.get("mgpu_t_tflops"))} '
      f'| {fmt(r.get("dense_tflops"))} | {fmt(r.get("new_n_vs_dense"), ".0%")} '
      f'| {fmt(r.get("new_t_vs_dense"), ".0%")} | {fmt(r.get("mgpu_n_vs_dense"), ".0%")} '
      f'| {err_new:.1e} | {err_mg:.1e} |' + (' (earlier run)' if 'from_run' in r else '')
    )
  errs = [(r, kk, v) for r in result['table'] for kk, v in r.items() if kk.endswith('_error')]
  if errs:
    lines += ['', 'Errors:', '']
    lines += [f'- M={r["m"]} K={r["k"]} N={r["n"]} G={r["g"]} {kk}: {v}' for r, kk, v in errs]
  if result['sweep']:
    lines += [
      '',
      '## Tiling sweep of the new kernel (transpose_rhs=False)',
      '',
      '| M | K | N | G | tiling (m,n,k,steps,gbn,dr) | ms | TFLOP/s | max err | error |',
      '|---|---|---|---|---|---|---|---|---|',
    ]
    for r in result['sweep']:
      lines.append(
        f'| {r["m"]} | {r["k"]} | {r["n"]} | {r["g"]} | {r["tiling"]} | {fmt(r.get("ms"), ".3f")} '
        f'| {fmt(r.get("tflops"))} | {fmt(r.get("max_rel"), ".1e")} '
        f'| {r.get("error", "")[:120]}{" (earlier run)" if "from_run" in r else ""} |'
      )
  return '\n'.join(lines + _notes_and_groups(result)) + '\n'


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--out', default='')
  p.add_argument('--render', default='', help='rewrite the markdown beside a saved JSON; no run')
  p.add_argument('--smoke', action='store_true', help='tiny shapes on CPU, lax stand-ins')
  p.add_argument(
    '--kernel',
    default='forward',
    choices=('forward', 'transposed'),
    help='forward: ragged_dot (gmm_2wg.*); transposed: the weight-gradient kernel (tgmm_2wg.*)',
  )
  p.add_argument(
    '--parts',
    default='',
    help='forward: sweep,table; transposed: check,sweep,table (default all)',
  )
  p.add_argument('--check_max', type=int, default=0, help='transposed check: first N tilings')
  p.add_argument(
    '--stop_on_fail', action='store_true', help='transposed: no sweep or table after a failed check'
  )
  p.add_argument('--calls', type=int, default=20)
  p.add_argument('--chains', type=int, default=5)
  p.add_argument(
    '--budget_s', type=float, default=250.0, help='start no new measurement after this many seconds'
  )
  p.add_argument('--verbose', action='store_true')
  p.add_argument('--best_from', default='', help='JSON of an earlier run: reuse its sweep')
  p.add_argument('--sweep_m', type=int, default=0, help='sweep at this M (default: largest)')
  p.add_argument('--sweep_extra', action='store_true', help='sweep also block_m=64 tilings')
  p.add_argument('--sweep_max', type=int, default=0, help='sweep: only the first N tilings')
  p.add_argument('--only_g', type=int, default=0, help='table: only shapes with this G')
  p.add_argument('--big_first', action='store_true', help='table: largest M first')
  p.add_argument(
    '--merge_from',
    default='',
    help='JSON of an earlier run: keep its table rows '
    'for shapes this run did not measure (marked from_run)',
  )
  p.add_argument('--max_shapes', type=int, default=0, help='table: only the first N shapes')
  argv = sys.argv[1:] if argv is None else list(argv)
  args = p.parse_args(argv)
  args.argv = argv
  if args.render:
    with open(args.render) as f:
      result = json.load(f)
    render = t_markdown if result.get('kernel') == 'transposed' else markdown
    with open(os.path.splitext(args.render)[0] + '.md', 'w') as f:
      f.write(render(result))
    return result
  if not args.out:
    p.error('--out is required')
  if args.smoke:
    jax.config.update('jax_platforms', 'cpu')
  os.makedirs(args.out, exist_ok=True)
  transposed = args.kernel == 'transposed'
  args.parts = args.parts or ('check,sweep,table' if transposed else 'sweep,table')
  result = run_transposed(args) if transposed else run(args)
  md = t_markdown(result) if transposed else markdown(result)
  stem = 'tgmm_2wg' if transposed else 'gmm_2wg'
  with open(os.path.join(args.out, f'{stem}.json'), 'w') as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(args.out, f'{stem}.md'), 'w') as f:
    f.write(md)
  print(md)
  return result


if __name__ == '__main__':
  main()
