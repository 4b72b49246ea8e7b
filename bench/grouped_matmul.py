"""Grouped-matmul kernels for dropless experts at the seed's shapes: tiling sweep and timings.

For each matmul of the expert FFN (w_in: [rows, 4096] x [G, 4096, 16384]; w_out: [rows, 16384] x
[G, 16384, 4096]) and each of its three kernel calls (forward, backward data = forward kernel
with the weight transposed, backward weight = the transposed kernel), times JAX's Mosaic-GPU
kernels (`mas_jax/layers/grouped_matmul.py`) over a grid of tilings at 4 local experts, checks
each result against `jax.lax.ragged_dot`, and reports the fastest tiling beside the bf16 matmul
ceiling measured in the same run. Then times the whole expert FFN (forward, and forward +
backward) with the best tilings for 1..16 local experts against the capacity-padded einsum
(capacity factor 1.25) and XLA's `ragged_dot`, on routed row counts drawn from a real top-2
router over random tokens (so groups are uneven, as in training).

Writes docs/benchmarks/<device>_grouped_matmul.{json,md}.

  python bench/grouped_matmul.py              # on an sm_90 GPU
  python bench/grouped_matmul.py --smoke      # tiny shapes on CPU through lax.ragged_dot kernels
  python bench/grouped_matmul.py --render=docs/benchmarks/<device>_grouped_matmul.json
  python bench/grouped_matmul.py --breakdown=docs/benchmarks/<device>_grouped_matmul.json
--render rewrites the markdown of a saved result; --breakdown prints the figures
docs/benchmarks/README.md derives from it (rates per tile shape, the best calls' range, the
library's tilings against the best, the routed group sizes). Neither measures anything.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import bench  # noqa: E402

from mas_jax.layers import grouped_matmul as gmm_lib  # noqa: E402
from mas_jax.layers import moe as moe_lib  # noqa: E402


def reference_kernels() -> gmm_lib.Kernels:
  """lax.ragged_dot with the Mosaic kernels' signatures (tiling ignored): the CPU stand-in."""

  def forward(lhs, rhs, *, group_sizes, transpose_rhs=False, **_):
    rhs = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
    return jax.lax.ragged_dot(lhs, rhs, group_sizes)

  def transposed(lhs, rhs, *, group_sizes, **_):
    dims = jax.lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(((0,), (0,)), ((), ())),
      lhs_ragged_dimensions=[0],
      rhs_group_dimensions=[],
    )
    return jax.lax.ragged_dot_general(lhs, rhs, group_sizes, dims)

  return gmm_lib.Kernels(forward, transposed)


def routed_sizes(tokens: int, total_experts: int, local: int, d: int, seed: int) -> np.ndarray:
  """Row counts of `local` experts under a top-2 softmax router over random tokens."""
  keys = jax.random.split(jax.random.key(seed), 2)
  x = jax.random.normal(keys[0], (1, tokens, d), jnp.float32)
  w = jax.random.normal(keys[1], (d, total_experts), jnp.float32) / d**0.5
  experts = moe_lib.router(x, w, 2)['experts']
  counts = np.bincount(np.asarray(experts).ravel(), minlength=total_experts)
  return counts[:local].astype(np.int32)


def tilings(s: dict):
  for bm, bn, bk, steps, gbn in itertools.product(
    s['block_m'], s['block_n'], s['block_k'], s['steps'], s['grid_block_n']
  ):
    yield gmm_lib.Tiling(bm, bn, bk, steps, gbn)


def call(role: str, kernels, lhs, rhs, dout, sizes, tiling):
  """One kernel call of `role` ('forward' | 'backward_data' | 'backward_weight')."""
  kw = tiling.kwargs()
  if role == 'forward':
    return jax.jit(
      lambda a, b, g: kernels.forward(a, b, group_sizes=g, transpose_rhs=False, **kw)
    ), (lhs, rhs, sizes)
  if role == 'backward_data':
    return jax.jit(
      lambda a, b, g: kernels.forward(a, b, group_sizes=g, transpose_rhs=True, **kw)
    ), (dout, rhs, sizes)
  return jax.jit(lambda a, b, g: kernels.transposed(a, b, group_sizes=g, **kw)), (lhs, dout, sizes)


def reference(role: str, lhs, rhs, dout, sizes):
  f32 = jnp.float32
  if role == 'forward':
    return jax.lax.ragged_dot(lhs.astype(f32), rhs.astype(f32), sizes)
  if role == 'backward_data':
    return jax.lax.ragged_dot(dout.astype(f32), jnp.swapaxes(rhs, 1, 2).astype(f32), sizes)
  return reference_kernels().transposed(lhs.astype(f32), dout.astype(f32), group_sizes=sizes)


def sweep(s: dict, kernels, mm_tflops: float) -> tuple[list[dict], dict]:
  """Times every tiling of every role at `s['tune_local']` experts; returns rows and the best."""
  rows, best = [], {}
  d, f, local = s['d_model'], s['expert_hidden'], s['tune_local']
  sizes_np = routed_sizes(s['tokens'], 16, local, d, 0)
  sizes_np[-1] += -sizes_np.sum() % gmm_lib.ROW_ALIGN  # direct kernel calls: no padding wrapper
  m = int(sizes_np.sum())
  sizes = jnp.asarray(sizes_np)
  for name, (k, n) in (('w_in', (d, f)), ('w_out', (f, d))):
    keys = jax.random.split(jax.random.key(k), 3)
    lhs = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    rhs = (jax.random.normal(keys[1], (local, k, n), jnp.float32) / k**0.5).astype(jnp.bfloat16)
    dout = jax.random.normal(keys[2], (m, n), jnp.bfloat16)
    flops = 2 * m * k * n
    for role in ('forward', 'backward_data', 'backward_weight'):
      ref = reference(role, lhs, rhs, dout, sizes)
      scale = float(jnp.max(jnp.abs(ref)))
      for tiling in tilings(s):
        row = {'matrix': name, 'role': role, 'rows': m, 'tiling': tiling.kwargs()}
        try:
          fn, args = call(role, kernels, lhs, rhs, dout, sizes, tiling)
          out = fn(*args)
          err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) / scale
          t = bench(fn, *args, repeats=s['repeats'])
        except Exception as e:  # noqa: BLE001  (a tiling the kernel rejects: smem, shape)
          row['error'] = str(e).splitlines()[0][:160]
          rows.append(row)
          continue
        row.update(time_s=t, tflops=flops / t / 1e12, max_rel_error=err)
        row['of_matmul'] = row['tflops'] / mm_tflops
        rows.append(row)
        print(
          f'{name} {role} {tiling} {t * 1e3:.3f} ms {row["tflops"]:.0f} TFLOP/s err {err:.1e}',
          flush=True,
        )
        key = (name, role)
        if err < 2e-2 and (key not in best or t < best[key]['time_s']):
          best[key] = row
  return rows, best


def ffn_sweep(s: dict, kernels, tiles: dict) -> list[dict]:
  """Whole expert FFN, forward and forward + backward, of each of s['ffn_impls'] (default
  FFN_IMPLS: einsum, ragged_dot, mosaic_gpu and the dense yardstick)."""
  impls = s.get('ffn_impls', FFN_IMPLS)
  two_wg = None
  if MOSAIC_2WG in impls:
    two_wg = kernels if s.get('smoke') else gmm_lib.two_warpgroup_kernels()
  rows = []
  d, f = s['d_model'], s['expert_hidden']
  for local in s['local_experts']:
    sizes_np = routed_sizes(s['tokens'], 16, local, d, 1)
    m = int(sizes_np.sum())
    cap = int(np.ceil(1.25 * s['tokens'] * 2 / 16))
    keys = jax.random.split(jax.random.key(local), 3)
    w_in = (jax.random.normal(keys[0], (local, d, f), jnp.float32) / d**0.5).astype(jnp.bfloat16)
    w_out = (jax.random.normal(keys[1], (local, f, d), jnp.float32) / f**0.5).astype(jnp.bfloat16)
    xr = jax.random.normal(keys[2], (m, d), jnp.bfloat16)
    xe = jax.random.normal(keys[2], (1, local, cap, d), jnp.bfloat16)
    sizes = jnp.asarray(sizes_np)

    def grouped(x, a, b, g, impl, ks=kernels):
      t_in, t_out = (tiles['w_in'], tiles['w_out']) if tiles else (None, None)
      h = gmm_lib.gmm(x, a, g, impl, tilings=t_in, kernels=ks)
      h = jax.nn.gelu(h, approximate=True)
      return gmm_lib.gmm(h, b, g, impl, tilings=t_out, kernels=ks)

    fns = {  # the order of FFN_IMPLS
      'einsum': (lambda x, a, b, g: moe_lib.expert_ffn(x, a, b, 'gelu'), xe),
      'ragged_dot': (lambda x, a, b, g: grouped(x, a, b, g, 'xla'), xr),
      'mosaic_gpu': (lambda x, a, b, g: grouped(x, a, b, g, 'mosaic_gpu'), xr),
      # The two-warpgroup pair below TWO_WARPGROUP_MIN_ROWS too (CPU: the stand-ins).
      MOSAIC_2WG: (lambda x, a, b, g: grouped(x, a, b, g, 'mosaic_gpu', two_wg), xr),
      # The same FLOPs as one dense FFN: every routed row through expert 0's weights.
      DENSE: (lambda x, a, b, g: jax.nn.gelu(x @ a[0], approximate=True) @ b[0], xr),
    }
    fns = {name: fns[name] for name in impls}
    useful = 2 * 2 * m * d * f
    row = {'local_experts': local, 'rows': m, 'group_sizes': sizes_np.tolist(), 'capacity': cap}
    # Which kernels 'mosaic_gpu' ran (kernels None: the library's choice for m rows; one group
    # is a dense matmul, `gmm_lib.gmm`).
    chosen = kernels or gmm_lib.mosaic_gpu_kernels(m)
    one_group = local == 1
    row['mosaic_forward'] = ONE_GROUP if one_group else chosen.forward.__module__
    row['mosaic_transposed'] = ONE_GROUP if one_group else chosen.transposed.__module__
    outs = {}
    # A random cotangent (with sum() as the loss XLA turns the backward's ones @ W into a
    # reduce), and value_and_grad so the forward's last matmul is not dead code.
    cot = jax.random.normal(jax.random.key(7), (m, d), jnp.bfloat16)
    cot_e = jax.random.normal(jax.random.key(7), xe.shape, jnp.bfloat16)
    for name, (fn, x) in fns.items():
      c = cot_e if name == 'einsum' else cot
      loss = lambda x, a, b, g, fn=fn, c=c: jnp.vdot(fn(x, a, b, g), c).astype(jnp.float32)
      grad = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
      try:
        outs[name] = jax.jit(fn)(x, w_in, w_out, sizes)
        tf = bench(jax.jit(fn), x, w_in, w_out, sizes, repeats=s['repeats'])
        tb = bench(grad, x, w_in, w_out, sizes, repeats=s['repeats'])
      except Exception as e:  # noqa: BLE001
        row[f'{name}_error'] = str(e).splitlines()[0][:160]
        continue
      row[f'{name}_fwd_s'] = tf
      row[f'{name}_fwd_bwd_s'] = tb
      row[f'{name}_fwd_useful_tflops'] = useful / tf / 1e12
      row[f'{name}_fwd_bwd_useful_tflops'] = 3 * useful / tb / 1e12
    if 'mosaic_gpu' in outs and 'ragged_dot' in outs:
      ref = outs['ragged_dot'].astype(jnp.float32)
      row['mosaic_vs_ragged_max_rel_error'] = float(
        jnp.max(jnp.abs(outs['mosaic_gpu'].astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref))
      )
    rows.append(row)
    print(row, flush=True)
  return rows


GPU = {
  'matmul_n': 8192,
  'd_model': 4096,
  'expert_hidden': 16384,
  'tokens': 8192,
  'tune_local': 4,
  'local_experts': [1, 2, 4, 8, 16],
  'block_m': [64, 128],
  'block_n': [128, 256],
  'block_k': [64],
  'steps': [3, 4],
  'grid_block_n': [1, 8],
  'repeats': 20,
}
SMOKE = {
  'matmul_n': 64,
  'd_model': 128,
  'expert_hidden': 256,
  'tokens': 64,
  'tune_local': 2,
  'local_experts': [2],
  'block_m': [64],
  'block_n': [64],
  'block_k': [64],
  'steps': [2],
  'grid_block_n': [1],
  'repeats': 1,
}


def markdown(r: dict) -> str:
  mm = r['matmul_bf16_tflops']
  out = [
    f'# Grouped matmul on {r["device"]}, JAX {r["jax"]}',
    '',
    f'Command: `{common.shell_command(r["command"])}`. '
    f'bf16 matmul ceiling ({r["matmul_n"]}^3, same run): {mm:.0f} TFLOP/s.',
    '',
    f'## Fastest tiling per kernel call ({r["tune_local"]} local experts, routed rows)',
    '',
    '| matrix | call | rows | tiling (m, n, k, steps, grid_n) | ms | TFLOP/s | % of matmul | '
    'max rel. error |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for b in r['best']:
    t = b['tiling']
    out.append(
      f'| {b["matrix"]} | {b["role"]} | {b["rows"]} | {t["block_m"]}, {t["block_n"]}, '
      f'{t["block_k"]}, {t["max_concurrent_steps"]}, {t["grid_block_n"]} | '
      f'{b["time_s"] * 1e3:.3f} | {b["tflops"]:.0f} | {b["of_matmul"]:.0%} | '
      f'{b["max_rel_error"]:.1e} |'
    )
  return '\n'.join(out + ffn_table(r['expert_ffn'], mm)) + '\n'


IMPL_NAMES = ('einsum', 'ragged_dot', 'mosaic_gpu')
# `ffn_sweep`'s yardstick: the routed rows through one dense FFN (XLA's matmuls), the same FLOPs.
DENSE = 'dense'
FFN_IMPLS = IMPL_NAMES + (DENSE,)
# On request only: 'mosaic_gpu' with our two-warpgroup kernels at any row count (the library
# picks them from TWO_WARPGROUP_MIN_ROWS rows), to place that threshold.
MOSAIC_2WG = 'mosaic_2wg'
# Only in results of commit f41638a (docs/benchmarks/session11/call4/), whose 'mosaic_gpu' rows
# started each group at a multiple of the row tile (`mosaic_group_align`): the library's kernels
# on the rows as sorted. The alignment measured slower and was reverted; the table still shows
# those rows.
MOSAIC_UNALIGNED = 'mosaic_unaligned'
# What --ffn_impls accepts, and what the tables show (in this order) where a result has it.
REQUESTABLE = FFN_IMPLS + (MOSAIC_2WG,)
SHOWN = REQUESTABLE + (MOSAIC_UNALIGNED,)


# What `ffn_sweep` records as the kernels of a one-group row: gmm's dense matmul.
ONE_GROUP = 'dense matmul (one group)'


def parse_impls(spec: str, parser: argparse.ArgumentParser) -> tuple[str, ...]:
  """`ffn_sweep`'s implementations from a --ffn_impls comma list (a parser error if unknown)."""
  impls = tuple(filter(None, spec.split(',')))
  unknown = sorted(set(impls) - set(REQUESTABLE))
  if unknown or not impls:
    parser.error(f'--ffn_impls={spec!r}: {unknown or "none"} not among {REQUESTABLE}')
  return impls


def _mosaic_caption(rows: list[dict]) -> str:
  """What the 'mosaic_gpu' rows ran, from what each recorded. Results before `mosaic_forward`
  was recorded ran JAX's single-warpgroup forward kernel; before `mosaic_transposed`, the
  weight gradient ran the transposed kernel `two_warpgroup_kernels()` returned when they were
  written: JAX's before commit 207d182, gmm_hopper.transposed_ragged_dot from it (with JAX's
  single-warpgroup forward, always JAX's)."""
  parts = {}
  for e in rows:
    fwd, tr = e.get('mosaic_forward', ''), e.get('mosaic_transposed')
    if fwd == ONE_GROUP:
      what = 'a dense matmul (gmm runs one group as jnp.dot)'
    else:
      what = (
        'our two-warpgroup kernel (mas_jax/layers/gmm_hopper.py)'
        if 'gmm_hopper' in fwd
        else "JAX's single-warpgroup kernel"
      ) + ' for the forward and the data gradient, '
      if tr is None and 'gmm_hopper' not in fwd:  # JAX's single-warpgroup pair
        tr = 'transposed_ragged_dot_mgpu'
      if tr is None:
        what += (
          "the library's transposed kernel of the time for the weight gradient (JAX's before "
          'commit 207d182, gmm_hopper.transposed_ragged_dot from it)'
        )
      elif 'gmm_hopper' in tr:
        what += 'our two-warpgroup transposed kernel for the weight gradient'
      else:
        what += "JAX's transposed kernel for the weight gradient"
      if e.get('mosaic_group_align', 1) > 1:
        what += f', each group starting at a multiple of {e["mosaic_group_align"]} rows'
    experts = parts.setdefault(what, [])
    if str(e['local_experts']) not in experts:
      experts.append(str(e['local_experts']))
  if not parts:
    return 'mosaic_gpu: the Hopper kernels with the tuned tilings.'
  return (
    'mosaic_gpu, with the tuned tilings: '
    + '; '.join(f'at {", ".join(experts)} local experts {what}' for what, experts in parts.items())
    + '.'
  )


def ffn_table(rows: list[dict], mm: float) -> list[str]:
  """Markdown lines of `ffn_sweep`'s rows, rates against the matmul ceiling mm (TFLOP/s)."""
  mosaic = _mosaic_caption(rows)
  # Results before the dense yardstick was recorded have no 'of dense' columns.
  dense = any(f'{DENSE}_fwd_s' in e for e in rows)
  extra_head, extra_rule = (' % of dense | fwd+bwd % of dense |', '---|---|') if dense else ('', '')
  out = [
    '',
    '## Expert FFN, useful TFLOP/s (routed rows only) and % of the matmul ceiling',
    '',
    'einsum: capacity-padded batched einsum (capacity factor 1.25); ragged_dot: XLA; '
    f'{mosaic} fwd+bwd counts 3x the forward.'
    + (
      f' {DENSE}: the same routed rows through one dense FFN (XLA matmuls, the same FLOPs), '
      'the yardstick of the "of dense" columns.'
      if dense
      else ''
    )
    + (
      f' {MOSAIC_2WG}: mosaic_gpu with our two-warpgroup kernels at every row count.'
      if any(f'{MOSAIC_2WG}_fwd_s' in e for e in rows)
      else ''
    )
    + (
      f' {MOSAIC_UNALIGNED}: mosaic_gpu on the sorted rows, groups not aligned to the row tile.'
      if any(f'{MOSAIC_UNALIGNED}_fwd_s' in e for e in rows)
      else ''
    ),
    '',
    '| local experts | routed rows | impl | fwd ms | fwd TFLOP/s | % | fwd+bwd ms | '
    'fwd+bwd TFLOP/s | % |' + extra_head,
    '|---|---|---|---|---|---|---|---|---|' + extra_rule,
  ]
  for e in rows:
    for impl in SHOWN:
      if f'{impl}_fwd_s' not in e and f'{impl}_error' not in e:
        continue  # not run (ffn_impls)
      if f'{impl}_fwd_s' not in e:
        blank = ' | |' if dense else ''
        out.append(
          f'| {e["local_experts"]} | {e["rows"]} | {impl} | error: {e[impl + "_error"]} '
          f'| | | | | |{blank}'
        )
        continue
      ft, bt = e[f'{impl}_fwd_useful_tflops'], e[f'{impl}_fwd_bwd_useful_tflops']
      line = (
        f'| {e["local_experts"]} | {e["rows"]} | {impl} | {e[f"{impl}_fwd_s"] * 1e3:.3f} | '
        f'{ft:.0f} | {ft / mm:.0%} | {e[f"{impl}_fwd_bwd_s"] * 1e3:.3f} | {bt:.0f} | '
        f'{bt / mm:.0%} |'
      )
      if dense:
        df, db = e.get(f'{DENSE}_fwd_useful_tflops'), e.get(f'{DENSE}_fwd_bwd_useful_tflops')
        line += f' {ft / df:.0%} | {bt / db:.0%} |' if df else ' | |'
      out.append(line)
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--smoke', action='store_true', help='tiny shapes on CPU')
  parser.add_argument('--out', default='docs/benchmarks')
  parser.add_argument('--render', metavar='RESULT_JSON', help='rewrite the markdown of a result')
  parser.add_argument('--breakdown', metavar='RESULT_JSON', help="print a result's figures")
  args = parser.parse_args()
  if args.render:
    common.render(args.render, markdown)
    return
  if args.breakdown:
    print('\n'.join(breakdown(args.breakdown)))
    return
  s = SMOKE if args.smoke else GPU
  kernels = reference_kernels() if args.smoke else gmm_lib.one_warpgroup_kernels()
  device = jax.devices()[0].device_kind
  n = s['matmul_n']
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  t = bench(jax.jit(lambda x, y: x @ y), a, a, repeats=50, warmup=100)
  mm = 2 * n**3 / t / 1e12
  print(f'matmul {mm:.0f} TFLOP/s', flush=True)
  rows, best = sweep(s, kernels, mm)
  tiles = {
    name: tuple(
      gmm_lib.Tiling(**best[(name, role)]['tiling']) if (name, role) in best else gmm_lib.Tiling()
      for role in ('forward', 'backward_data', 'backward_weight')
    )
    for name in ('w_in', 'w_out')
  }
  result = {
    'device': device,
    'jax': jax.__version__,
    'command': common.command_line(__file__),
    'matmul_n': n,
    'matmul_bf16_tflops': mm,
    'tune_local': s['tune_local'],
    'best': list(best.values()),
    'tilings': rows,
    'expert_ffn': ffn_sweep(s, kernels, tiles),
  }
  table = markdown(result)
  common.write_result(args.out, f'{common.device_stem(args.smoke)}_grouped_matmul', result, table)
  print(table)


def breakdown(path: str) -> list[str]:
  """The figures docs/benchmarks/README.md derives from the result at `path`, as lines."""
  with open(path) as f:
    r = json.load(f)
  mm = r['matmul_bf16_tflops']
  timed = [t for t in r['tilings'] if 'time_s' in t]
  out = [
    f'{path}: {r["device"]}, command `{common.shell_command(r["command"])}`',
    f'matmul ceiling {mm:.1f} TFLOP/s; sweep: {len(timed)} kernel calls timed, '
    f'{len(r["tilings"]) - len(timed)} tilings rejected; max relative error '
    f'{max(t["max_rel_error"] for t in timed):.1e}',
    'TFLOP/s per tile (block_m x block_n) over every call and the other tiling fields:',
  ]
  shapes = sorted({(t['tiling']['block_m'], t['tiling']['block_n']) for t in timed})
  for bm, bn in shapes:
    rates = [
      t['tflops'] for t in timed if (t['tiling']['block_m'], t['tiling']['block_n']) == (bm, bn)
    ]
    out.append(f'  {bm} x {bn}: {min(rates):.1f}-{max(rates):.1f} ({len(rates)} timings)')
  shares = [b['of_matmul'] for b in r['best']]
  out.append(f'best tiling of each call: {min(shares):.1%}-{max(shares):.1%} of the ceiling')
  # The sweep timed JAX's single-warpgroup kernels: the library's tilings for them.
  library = {'w_in': gmm_lib.ONE_WARPGROUP_WIDENING, 'w_out': gmm_lib.ONE_WARPGROUP_NARROWING}
  out.append("the library's tilings (mas_jax/layers/grouped_matmul.py) against each call's best:")
  for b in r['best']:
    role = ('forward', 'backward_data', 'backward_weight').index(b['role'])
    tiling = library[b['matrix']][role].kwargs()
    same = [
      t for t in timed if (t['matrix'], t['role'], t['tiling']) == (b['matrix'], b['role'], tiling)
    ]
    slower = f'{same[0]["time_s"] / b["time_s"] - 1:+.1%} time' if same else 'not in the sweep'
    out.append(f'  {b["matrix"]} {b["role"]}: {tuple(tiling.values())}, {slower}')
  sizes = [g for e in r['expert_ffn'] for g in e['group_sizes']]
  if sizes:
    out.append(f'expert FFN: {min(sizes)}-{max(sizes)} routed rows per expert')
  return out


if __name__ == '__main__':
  main()
