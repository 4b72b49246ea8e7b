"""One-device benchmark: ceilings, per-role kernels at the seed's shapes, and the full train step.

Everything runs in one process so the figures share one device state:
  1. ceilings: bf16 matmul (8192^3, random data) and an HBM copy (bytes read + written);
  2. attention block (QKV, causal attention, output projection; forward, and forward + backward)
     with k heads per device over batch x 2048 tokens, d_model 4096, head_dim 128, for the cuDNN
     and the XLA attention kernel;
  3. expert FFN (d 4096 -> 16384 -> 4096, GELU) of 1..16 local experts on top-2 routed tokens:
     the capacity-padded batched einsum, `jax.lax.ragged_dot` and the Mosaic-GPU grouped kernels
     (dropless), and one dense FFN of the same FLOPs, with the rate of useful FLOPs (routed
     tokens only) against the matmul ceiling and against the dense FFN;
  4. the mas-jax train step (forward, backward, AdamW; `train_lib` with synthetic data) of the
     largest seed-shaped model that fits one GPU, with MFU against the datasheet peak.
Writes docs/benchmarks/<device>.json, a markdown table next to it, and the planner's
calibration file docs/benchmarks/<device>_calibration.json.

  python bench/gpu_bench.py                 # on a GPU
  python bench/gpu_bench.py --smoke         # tiny shapes on CPU (run by the test suite)
  python bench/gpu_bench.py --skip attention,experts --train_rows=levers
      # ceilings, then the best train step alone and with issue 17's levers (bf16 AdamW first
      # moments, model.loss_chunk, both); --train_rows also takes indices of the train table
  python bench/gpu_bench.py --skip attention,experts --train_rows=fuse
      # ceilings, then the best row with both levers without and with train.fuse_grad_accum
  python bench/gpu_bench.py --skip attention,experts --train_rows=grouped
      # ... and the best row with both levers on the einsum and on the grouped kernels
      # (--train_rows=fuse+grouped: the three rows of both)
  python bench/gpu_bench.py --recalibrate=docs/benchmarks/<device>.json   # calibration only
  python bench/gpu_bench.py --render=docs/benchmarks/<device>.json        # markdown only
  python bench/gpu_bench.py --breakdown=docs/benchmarks/<device>.json     # derived figures
The last three measure nothing and need no GPU. The result records the command that wrote it
(`common.command_line`); --breakdown prints the figures docs/benchmarks/README.md derives from a
result: ranges of the expert-FFN rates, where the best train step's time goes (the planner's
terms), its compute rate without the optimizer and the accumulator, and what expert dropout and
dropless routing cost.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import grouped_matmul  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from common import bench  # noqa: E402

from configs import paper  # noqa: E402
from mas_jax import metrics as metrics_lib  # noqa: E402
from mas_jax import perf as pm  # noqa: E402
from mas_jax.layers import attention as attn_lib  # noqa: E402
from mas_jax.perf import validate  # noqa: E402


def ceilings(s: dict) -> dict:
  n = s['matmul_n']
  keys = jax.random.split(jax.random.key(0), 2)
  a = jax.random.normal(keys[0], (n, n), jnp.bfloat16)
  b = jax.random.normal(keys[1], (n, n), jnp.bfloat16)
  # Long warm-up: the first seconds of GPU work run below full clocks.
  t = bench(jax.jit(lambda x, y: x @ y), a, b, repeats=50, warmup=100)
  x = jax.random.normal(keys[0], (s['copy_elems'],), jnp.float32)
  tc = bench(jax.jit(lambda v: v * 2.0), x, repeats=20, warmup=10)
  return {
    'matmul_bf16_tflops': 2 * n**3 / t / 1e12,
    'matmul_n': n,
    'hbm_copy_gbps': 2 * x.size * 4 / tc / 1e9,
  }


def attention_sweep(s: dict) -> list[dict]:
  rows = []
  d, hd, seq, batch = s['d_model'], 128, s['seq'], s['attn_batch']
  x = jax.random.normal(jax.random.key(1), (batch, seq, d), jnp.bfloat16)
  for impl in s['attn_impls']:
    for heads in s['heads']:
      ks = jax.random.split(jax.random.key(heads), 4)
      p = {
        n: jax.random.normal(k, (d, heads, hd), jnp.float32) / d**0.5
        for n, k in zip(('wq', 'wk', 'wv'), ks[:3], strict=True)
      }
      p['wo'] = jax.random.normal(ks[3], (heads, hd, d), jnp.float32) / d**0.5
      fwd = lambda p, x, impl=impl: attn_lib.attention(
        x, p, jnp.arange(seq), 1e4, implementation=impl
      )
      # A random cotangent (with sum() as the loss XLA turns ones @ W^T into a reduce), and
      # value_and_grad so the output projection's forward is not dead code.
      cot = jax.random.normal(jax.random.key(7), x.shape, x.dtype)
      try:
        tf = bench(jax.jit(fwd), p, x)
        grad = jax.jit(
          jax.value_and_grad(
            lambda p, x, fwd=fwd, c=cot: jnp.vdot(fwd(p, x), c).astype(jnp.float32), (0, 1)
          )
        )
        tb = bench(grad, p, x)
      except Exception as e:  # noqa: BLE001  (a kernel that does not support the shape)
        rows.append({'impl': impl, 'heads': heads, 'error': str(e).splitlines()[0][:120]})
        continue
      proj = 2 * batch * seq * d * heads * hd * 4
      core = 2 * 2 * batch * heads * seq * seq * hd / 2  # causal half
      rows.append(
        {
          'impl': impl,
          'heads': heads,
          'batch': batch,
          'seq': seq,
          'fwd_s': tf,
          'fwd_bwd_s': tb,
          'fwd_tflops': (proj + core) / tf / 1e12,
          'fwd_bwd_tflops': 3 * (proj + core) / tb / 1e12,
        }
      )
  return rows


def expert_sweep(s: dict) -> list[dict]:
  """bench/grouped_matmul.py's expert-FFN sweep with the library's kernels and tilings for each
  row count (CPU: stand-ins)."""
  kernels = grouped_matmul.reference_kernels() if s['smoke'] else None
  return grouped_matmul.ffn_sweep({**s, 'repeats': 10}, kernels, None)


def train_step(overrides: dict, repeats: int) -> dict:
  """Times the mas-jax train step of a seed-shaped model (reference strategy, one device)."""
  row = common.time_train_step({'parallel.strategy': 'reference', **overrides}, repeats)
  row.pop('strategy')
  return row


NO_DROPOUT = {'model.expert_dropout': 0.0}
# The fastest train step of docs/benchmarks/README.md (batch 64 as 4 x 16, no expert dropout).
BEST = {
  'parallel.num_microbatches': 1,
  'model.num_layers': 1,
  'data.batch_size': 64,
  'model.attention_impl': 'cudnn',
  'model.remat': 'none',
  'train.grad_accum_steps': 4,
  **NO_DROPOUT,
}
# model.loss_chunk of the lever rows: 8 chunks of a 16 x 2048-token micro-batch, each chunk's
# float32 logits [4096, 32000] 0.52 GB.
LOSS_CHUNK = 4096


def lever_rows(base: dict, loss_chunk: int) -> list[dict]:
  """Issue 17's optimizer levers on `base`: bfloat16 AdamW first moments, the chunked output
  head + cross entropy, and both."""
  mu, chunk = {'train.mu_dtype': 'bfloat16'}, {'model.loss_chunk': loss_chunk}
  return [{**base, **mu}, {**base, **chunk}, {**base, **mu, **chunk}]


def fuse_rows(base: dict) -> list[dict]:
  """`base` without and with train.fuse_grad_accum (the expert weight-gradient GEMMs add into
  the float32 accumulator; bench/grad_accum_fusion.py)."""
  return [base, {**base, 'train.fuse_grad_accum': True}]


def grouped_rows(base: dict) -> list[dict]:
  """`base` (capacity routing: the einsum over padded buffers) and the same routing on the
  Mosaic-GPU grouped kernels, which compute the kept pairs only (`moe.grouped_expert_ffn`)."""
  return [base, {**base, 'model.expert_impl': 'mosaic_gpu'}]


GPU = {
  'smoke': False,
  'matmul_n': 8192,
  'copy_elems': 1 << 28,
  'd_model': 4096,
  'seq': 2048,
  'attn_batch': 4,
  'heads': [1, 2, 3, 4, 8, 16, 32],
  'attn_impls': ['cudnn', 'xla'],
  'expert_hidden': 16384,
  'tokens': 8192,
  'local_experts': [1, 2, 4, 8, 16],
  'train_repeats': 5,
  'train_overrides': [
    {
      'parallel.num_microbatches': 1,
      'model.num_layers': 1,
      'data.batch_size': batch,
      'model.attention_impl': 'cudnn',
      'model.remat': remat,
      'train.grad_accum_steps': accum,
      **extra,
    }
    for batch, remat, accum, extra in (
      (4, 'none', 1, {}),
      (8, 'none', 1, {}),
      (8, 'save_dots', 1, {}),
      (32, 'full', 1, {}),
      (64, 'none', 8, {}),
      # Without the seed's expert dropout (the yardstick has none); then dropless routing
      # ('auto' experts: the einsum for capacity routing, the Mosaic-GPU grouped matmul dropless).
      (8, 'none', 1, NO_DROPOUT),
      (16, 'none', 1, NO_DROPOUT),
      (64, 'none', 4, NO_DROPOUT),
      (64, 'none', 8, NO_DROPOUT),
      (64, 'none', 4, {**NO_DROPOUT, 'model.dropless': True}),
    )
  ]
  + lever_rows(BEST, LOSS_CHUNK),
  # --train_rows=levers: the best row and its lever rows alone.
  'lever_rows': [BEST, *lever_rows(BEST, LOSS_CHUNK)],
  # --train_rows=fuse: the best row with both levers, without and with train.fuse_grad_accum.
  'fuse_rows': fuse_rows(lever_rows(BEST, LOSS_CHUNK)[-1]),
  # --train_rows=grouped: the best row with both levers, capacity routing on the einsum and on
  # the grouped kernels.
  'grouped_rows': grouped_rows(lever_rows(BEST, LOSS_CHUNK)[-1]),
  # --train_rows=dropless: the best row with both levers, dropless routing (train.fuse_grad_accum
  # takes einsum experts only).
  'dropless_rows': [{**lever_rows(BEST, LOSS_CHUNK)[-1], 'model.dropless': True}],
}
SMOKE_TRAIN = {
  'parallel.num_microbatches': 1,
  'model.num_layers': 1,
  'model.d_model': 64,
  'model.num_heads': 4,
  'model.expert_hidden': 128,
  'model.vocab_size': 256,
  'data.batch_size': 2,
  'data.seq_len': 16,
  'model.compute_dtype': 'float32',
}
SMOKE = {
  'smoke': True,
  'matmul_n': 64,
  'copy_elems': 1 << 12,
  'd_model': 128,
  'seq': 16,
  'attn_batch': 2,
  'heads': [1, 2],
  'attn_impls': ['xla'],
  'expert_hidden': 256,
  'tokens': 64,
  'local_experts': [2],
  'train_repeats': 1,
  'train_overrides': [SMOKE_TRAIN],
  'lever_rows': [SMOKE_TRAIN, *lever_rows(SMOKE_TRAIN, 8)],
  'fuse_rows': fuse_rows(
    {**SMOKE_TRAIN, 'parallel.strategy': 'reference', 'train.grad_accum_steps': 2}
  ),
  # On CPU the grouped row runs XLA's ragged_dot (mosaic_gpu needs a Hopper GPU).
  'grouped_rows': [SMOKE_TRAIN, {**SMOKE_TRAIN, 'model.expert_impl': 'ragged_dot'}],
  'dropless_rows': [{**SMOKE_TRAIN, 'model.dropless': True}],
}


def select_train_rows(s: dict, spec: str) -> list[dict]:
  """The train rows --train_rows names: 'all', 'levers' (s['lever_rows']: the best row and its
  lever rows), 'fuse' (s['fuse_rows']: the best lever row without and with
  train.fuse_grad_accum), 'grouped' (s['grouped_rows']: the best lever row with the capacity
  einsum and on the grouped kernels), 'dropless' (s['dropless_rows']), several of these names
  joined by '+' (each row once), or comma-separated indices into s['train_overrides']."""
  if spec == 'all':
    return s['train_overrides']
  sets = {
    'levers': 'lever_rows',
    'fuse': 'fuse_rows',
    'grouped': 'grouped_rows',
    'dropless': 'dropless_rows',
  }
  if all(name in sets for name in spec.split('+')):
    out = []
    for name in spec.split('+'):
      out += [row for row in s[sets[name]] if row not in out]
    return out
  rows = s['train_overrides']
  try:
    return [rows[int(i)] for i in spec.split(',')]
  except (ValueError, IndexError):
    raise SystemExit(
      f"--train_rows={spec!r}: 'all', {', '.join(map(repr, sets))} (joined by '+') or indices "
      f'in 0..{len(rows) - 1}'
    ) from None


def calibration(device: str, result: dict) -> dict:
  """The planner's calibration file (schema: mas_jax/perf/calibration.py)."""
  attn = [
    {
      'mode': 'train',
      'heads': r['heads'],
      'batch': r['batch'],
      'seq': r['seq'],
      'time_s': r['fwd_s'],
    }
    for r in result['attention']
    if r.get('impl') == 'cudnn' and 'fwd_s' in r
  ]
  ffn = [  # per routing, the fastest implementation's forward on the routed rows
    {
      'local_experts': r['local_experts'],
      'tokens': r['rows'],
      'dropless': dropless,
      'time_s': min(r[f'{i}_fwd_s'] for i in impls if f'{i}_fwd_s' in r),
    }
    for r in result['expert_ffn']
    for dropless, impls in ((False, ('einsum',)), (True, ('ragged_dot', 'mosaic_gpu')))
    if any(f'{i}_fwd_s' in r for i in impls)
  ]
  return {
    'device': device,
    'matmul_tflops': result['ceilings']['matmul_bf16_tflops'],
    'hbm_gbps': result['ceilings']['hbm_copy_gbps'],
    'kernels': {'attention': attn, 'expert_ffn': ffn},
  }


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--smoke', action='store_true', help='tiny shapes (CPU smoke test)')
  parser.add_argument('--out', default='docs/benchmarks')
  parser.add_argument('--skip', default='', help='comma list of: attention,experts,train')
  parser.add_argument(
    '--train_rows',
    default='all',
    help="train-step rows to time: 'all', 'levers' (the best row, then it with bf16 AdamW "
    "moments, the chunked cross entropy, both), 'fuse' (the best row with both levers, without "
    "and with train.fuse_grad_accum), 'grouped' (the best row with both levers, capacity routing "
    "on the einsum and on the grouped kernels), 'dropless' (the best row with both levers, "
    "dropless routing), names joined by '+' (e.g. 'fuse+grouped', each row once) or "
    'comma-separated indices of the table',
  )
  parser.add_argument(
    '--local_experts',
    default='',
    help='comma list of local-expert counts for the expert sweep (default: 1,2,4,8,16)',
  )
  parser.add_argument(
    '--ffn_impls',
    default=','.join(grouped_matmul.FFN_IMPLS),
    help="comma list of the expert sweep's implementations: einsum, ragged_dot, mosaic_gpu, "
    f'dense, {grouped_matmul.MOSAIC_2WG} (mosaic_gpu with our two-warpgroup kernels at every '
    'row count)',
  )
  parser.add_argument(
    '--recalibrate',
    metavar='RESULT_JSON',
    help='measure nothing: rewrite the calibration file next to a saved result JSON',
  )
  parser.add_argument(
    '--render',
    metavar='RESULT_JSON',
    help='measure nothing: rewrite the markdown of a saved result',
  )
  parser.add_argument(
    '--breakdown',
    metavar='RESULT_JSON',
    help="measure nothing: print the figures derived from a saved result (the planner's terms "
    'from the calibration file next to it)',
  )
  args = parser.parse_args()
  if args.render:
    common.render(args.render, markdown)
    return
  if args.breakdown:
    print('\n'.join(breakdown(args.breakdown)))
    return
  if args.recalibrate:
    with open(args.recalibrate) as f:
      saved = json.load(f)
    path = args.recalibrate.removesuffix('.json') + '_calibration.json'
    with open(path, 'w') as f:
      json.dump(calibration(saved['device'], saved), f, indent=1)
    print(f'wrote {path}')
    return
  s = {
    **(SMOKE if args.smoke else GPU),
    'ffn_impls': grouped_matmul.parse_impls(args.ffn_impls, parser),
  }
  if args.local_experts:
    try:
      s['local_experts'] = [int(n) for n in args.local_experts.split(',')]
    except ValueError:
      parser.error(f'--local_experts={args.local_experts!r}: a comma list of integers')
  skip = set(filter(None, args.skip.split(',')))
  train_rows = select_train_rows(s, args.train_rows)
  device = jax.devices()[0].device_kind
  result = {
    'device': device,
    'jax': jax.__version__,
    'command': common.command_line(__file__),
    'ceilings': ceilings(s),
  }
  print('ceilings', result['ceilings'], flush=True)
  name = common.device_stem(args.smoke)

  def save():  # after every section and train row, so a cut-off run keeps what it measured
    common.write_result(args.out, name, result, markdown(result))
    with open(os.path.join(args.out, f'{name}_calibration.json'), 'w') as f:
      json.dump(calibration(device, result), f, indent=1)

  result['attention'] = [] if 'attention' in skip else attention_sweep(s)
  result['expert_ffn'] = []
  result['train_step'] = []
  save()
  if 'experts' not in skip:
    result['expert_ffn'] = expert_sweep(s)
    save()
  for overrides in [] if 'train' in skip else train_rows:
    try:
      result['train_step'].append(train_step(overrides, s['train_repeats']))
    except Exception as e:  # noqa: BLE001  (out of memory, say: recorded, the rest still runs)
      result['train_step'].append({'overrides': overrides, 'error': str(e).splitlines()[0][:160]})
    print(result['train_step'][-1], flush=True)
    save()
  print(markdown(result))


def markdown(r: dict) -> str:
  c = r['ceilings']
  out = [
    f'# {r["device"]}, JAX {r["jax"]}',
    '',
    f'Command: `{common.shell_command(r["command"])}`',
    '',
    f'Ceilings: bf16 matmul {c["matmul_n"]}^3 {c["matmul_bf16_tflops"]:.1f} TFLOP/s; '
    f'HBM copy {c["hbm_copy_gbps"]:.0f} GB/s (read + write).',
    '',
    '## Attention block (QKV + causal attention + output projection)',
    '',
    '| impl | heads | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |',
    '|---|---|---|---|---|---|',
  ]
  for a in r['attention']:
    if 'error' in a:
      out.append(f'| {a["impl"]} | {a["heads"]} | error: {a["error"]} | | | |')
    else:
      out.append(
        f'| {a["impl"]} | {a["heads"]} | {a["fwd_s"] * 1e3:.3f} | '
        f'{a["fwd_tflops"]:.0f} | {a["fwd_bwd_s"] * 1e3:.3f} | '
        f'{a["fwd_bwd_tflops"]:.0f} |'
      )
  out += grouped_matmul.ffn_table(r['expert_ffn'], c['matmul_bf16_tflops'])
  if r['train_step']:
    out += [
      '',
      '## Train step (mas-jax, forward + backward + AdamW)',
      '',
    ]
    # Results since bench/common.py recorded it: the pairs the last timed step dropped. The
    # steps train on one repeated batch; where the router collapses onto a few experts, capacity
    # routing on the grouped kernels skips the dropped pairs and the step is not comparable.
    dropped = any(t.get('dropped_token_fraction') is not None for t in r['train_step'])
    extra_head, extra_rule = (' dropped |', '---|') if dropped else ('', '')
    out += [
      '| overrides of configs/paper.py | params | step ms | tokens/s | model TFLOP/s | MFU |'
      + extra_head,
      '|---|---|---|---|---|---|' + extra_rule,
    ]
    for t in r['train_step']:
      if 'error' in t:
        out.append(f'| `{t["overrides"]}` | error: {t["error"]} | | | | |' + ' |' * dropped)
        continue
      mfu = '-' if t['mfu'] is None else f'{t["mfu"]:.1%}'
      line = (
        f'| `{t["overrides"]}` | {t["params"]:.4g} | {t["step_s"] * 1e3:.1f} | '
        f'{t["tokens_per_s"]:.0f} | {t["model_tflops"]:.0f} | {mfu} |'
      )
      if dropped:
        d = t.get('dropped_token_fraction')
        line += ' - |' if d is None else f' {d:.2%} |'
      out.append(line)
  return '\n'.join(out) + '\n'


# Bytes per parameter that AdamW moves (fp32 parameter, gradient and two moments read; parameter
# and moments written: 7 x 4) and that the fp32 gradient accumulator moves per micro-batch (the
# accumulator read and written, the micro-batch's gradient read: 3 x 4).
ADAMW_BYTES_PER_PARAM = 28
ACCUMULATOR_BYTES_PER_PARAM = 12


def _span(values: list[float]) -> str:
  """'a-b%' of fractions (one value when they round alike)."""
  lo, hi = f'{min(values):.0%}', f'{max(values):.0%}'
  return lo if lo == hi else f'{lo[:-1]}-{hi}'


def _expert_lines(rows: list[dict], mm: float) -> list[str]:
  """Ranges of the expert-FFN table (share of the ceiling mm) and of its routed groups."""
  sizes = [g for r in rows for g in r['group_sizes']]
  if not sizes:
    return []
  out = [
    f'expert FFN: {min(sizes)}-{max(sizes)} routed rows per expert, local experts '
    f'{", ".join(str(r["local_experts"]) for r in rows)}; shares of the {mm:.0f} TFLOP/s ceiling:'
  ]
  impls = tuple(i for i in grouped_matmul.SHOWN if i != grouped_matmul.DENSE)
  for impl in impls:
    timed = [r for r in rows if f'{impl}_fwd_s' in r]
    if not timed:
      continue
    fwd = [r[f'{impl}_fwd_useful_tflops'] / mm for r in timed]
    bwd = [r[f'{impl}_fwd_bwd_useful_tflops'] / mm for r in timed]
    out.append(
      f'  {impl}: forward {_span(fwd)}, forward + backward {_span(bwd)}, both {_span(fwd + bwd)}'
    )
  dense = grouped_matmul.DENSE
  for impl in impls:  # against the same call's dense FFN of the same FLOPs
    timed = [r for r in rows if f'{impl}_fwd_s' in r and f'{dense}_fwd_s' in r]
    if timed:
      fwd = [r[f'{dense}_fwd_s'] / r[f'{impl}_fwd_s'] for r in timed]
      bwd = [r[f'{dense}_fwd_bwd_s'] / r[f'{impl}_fwd_bwd_s'] for r in timed]
      out.append(f'  {impl} of dense: forward {_span(fwd)}, forward + backward {_span(bwd)}')
      out.append(
        '    per local-expert count, forward + backward (forward): '
        + ', '.join(
          f'{r["local_experts"]}: {b:.0%} ({f:.0%})'
          for r, f, b in zip(timed, fwd, bwd, strict=True)
        )
      )
  for r in rows:  # the einsum computes capacity slots, not routed rows
    if 'einsum_fwd_s' in r:
      padded = r['local_experts'] * r['capacity'] / r['rows']
      fwd, bwd = r['einsum_fwd_useful_tflops'] / mm, r['einsum_fwd_bwd_useful_tflops'] / mm
      out.append(
        f'  einsum at {r["local_experts"]} local experts: {padded:.3f} slots per routed row; '
        f'forward {fwd:.0%} useful, {padded * fwd:.0%} with the padding; '
        f'forward + backward {bwd:.0%}, {padded * bwd:.0%}'
      )
  return out


def _pairs(steps: list[dict], key: str, value) -> list[str]:
  """Steps with overrides[key] == value against the step whose overrides differ only there."""
  out = []
  for t in steps:
    if t['overrides'].get(key) != value:
      continue
    rest = {k: v for k, v in t['overrides'].items() if k != key}
    for u in steps:
      other = {k: v for k, v in u['overrides'].items() if k != key}
      if u is not t and other == rest and u['overrides'].get(key) != value:
        o = t['overrides']
        out.append(
          f'  batch {o.get("data.batch_size")}, accumulation {o.get("train.grad_accum_steps", 1)}: '
          f'{t["step_s"] * 1e3:.1f} ms against {u["step_s"] * 1e3:.1f} ms '
          f'({key}={u["overrides"].get(key, "default")}): {t["step_s"] / u["step_s"] - 1:+.1%}, '
          f'{(t["step_s"] - u["step_s"]) * 1e3:+.1f} ms'
        )
  return out


def _planner_terms(path: str, device: str, best: dict) -> tuple[list[str], dict]:
  """The planner's terms of the best step, with the calibration file next to the result."""
  cal_path = path.removesuffix('.json') + '_calibration.json'
  if not os.path.exists(cal_path):
    return [f'(no {cal_path}: no planner terms)'], {}
  cal = pm.Calibration.load(cal_path)
  preset = next((n for n in pm.HARDWARE if n.split('_')[0] in device.lower()), 'h100')
  hw, _ = cal.apply(pm.load_hardware(preset), paper.get_config().model.compute_dtype)
  rows = validate.predict_rows(paper.get_config(), hw, cal, [path])
  row = next(r for r in rows if r.overrides == best['overrides'])
  terms = {t.name: t.time_s for t in row.terms}
  return [
    f'planner terms (mas_jax.perf, hardware {preset}, {cal_path}), ms: '
    + ', '.join(f'{k} {v * 1e3:.1f}' for k, v in sorted(terms.items(), key=lambda kv: -kv[1])),
    f'  kernels-only {row.kernels_s * 1e3:.1f} ms: measured minus kernels-only '
    f'{(row.measured_s - row.kernels_s) * 1e3:.1f} ms; predicted {row.predicted_s * 1e3:.1f} ms',
  ], terms


def breakdown(path: str) -> list[str]:
  """The figures docs/benchmarks/README.md derives from the result at `path`, as lines."""
  with open(path) as f:
    r = json.load(f)
  c = r['ceilings']
  mm, hbm = c['matmul_bf16_tflops'], c['hbm_copy_gbps']
  peak = metrics_lib.peak_flops(r['device'])
  out = [f'{path}: {r["device"]}, command `{common.shell_command(r["command"])}`']
  out.append(
    f'ceilings: matmul {mm:.1f} TFLOP/s, HBM copy {hbm:.0f} GB/s; datasheet peak '
    + ('unknown' if peak is None else f'{peak / 1e12:.0f} TFLOP/s')
  )
  out += _expert_lines(r['expert_ffn'], mm)
  steps = [t for t in r['train_step'] if 'step_s' in t]
  if not steps:
    return out
  out += _yardstick_lines(path, steps, peak)
  best = max(steps, key=lambda t: t['model_tflops'])
  accum = best['overrides'].get('train.grad_accum_steps', 1)
  flop = best['model_tflops'] * best['step_s']  # TFLOP per step
  out.append(
    f'best train step: {best["step_s"] * 1e3:.1f} ms, {best["model_tflops"]:.1f} TFLOP/s, '
    f'{flop:.2f} TFLOP, {accum} micro-batches of '
    f'{best["overrides"]["data.batch_size"] // accum} sequences: {flop / accum:.2f} TFLOP each'
  )
  params = best['params']
  # bfloat16 first moments: m read and written in 2 bytes each instead of 4.
  adamw_bytes = ADAMW_BYTES_PER_PARAM - 4 * (best['overrides'].get('train.mu_dtype') == 'bfloat16')
  adamw_s = params * adamw_bytes / (hbm * 1e9)
  accum_s = params * ACCUMULATOR_BYTES_PER_PARAM / (hbm * 1e9)
  out.append(
    f'HBM-bound estimates at {hbm:.0f} GB/s, {params:.4g} parameters: AdamW '
    f'{params * adamw_bytes / 1e9:.1f} GB, {adamw_s * 1e3:.1f} ms per step; '
    f'accumulator {params * ACCUMULATOR_BYTES_PER_PARAM / 1e9:.1f} GB, {accum_s * 1e3:.1f} ms per '
    f'micro-batch'
  )
  lines, terms = _planner_terms(path, r['device'], best)
  out += lines
  # Without accumulation the step adds no separate accumulator.
  removed = {'HBM-bound estimates': adamw_s + (accum * accum_s if accum > 1 else 0.0)}
  if terms:
    removed["planner's optimizer + grad_accumulation"] = terms.get('optimizer', 0.0) + terms.get(
      'grad_accumulation', 0.0
    )
  for name, seconds in removed.items():
    t = (best['step_s'] - seconds) / accum
    rate = flop / accum / t
    out.append(
      f'without the optimizer and the accumulator ({name}, {seconds * 1e3:.1f} ms): '
      f'{t * 1e3:.1f} ms per micro-batch, {rate:.1f} TFLOP/s, '
      + ('' if peak is None else f'{rate * 1e12 / peak:.1%} of the datasheet peak, ')
      + f'{rate / mm:.1%} of the matmul ceiling'
    )
  out += ['expert dropout 0.1 (the default) against none:'] + _pairs(
    [t for t in steps if 'model.dropless' not in t['overrides']], 'model.expert_dropout', None
  )
  out += ['dropless against capacity routing:'] + _pairs(steps, 'model.dropless', True)
  out += ['bfloat16 AdamW first moments against float32:'] + _pairs(
    steps, 'train.mu_dtype', 'bfloat16'
  )
  out += [f'chunked cross entropy (model.loss_chunk={LOSS_CHUNK}) against unchunked:'] + _pairs(
    steps, 'model.loss_chunk', LOSS_CHUNK
  )
  out += ['fused gradient accumulator against the separate one:'] + _pairs(
    steps, 'train.fuse_grad_accum', True
  )
  out += ['capacity routing on the grouped kernels against the einsum:'] + _pairs(
    steps, 'model.expert_impl', 'mosaic_gpu'
  )
  return out


def _yardstick_lines(path: str, steps: list[dict], peak: float | None) -> list[str]:
  """Each step's MFU against bench/yardstick.py's, when the same call wrote yardstick.json
  beside the result."""
  y_path = os.path.join(os.path.dirname(path), 'yardstick.json')
  if peak is None or not os.path.exists(y_path):
    return []
  with open(y_path) as f:
    y = json.load(f)
  y_mfu = y['model_tflop_per_step'] * 1e12 / y['step_s'] / peak
  out = [f'yardstick ({y_path}): step {y["step_s"] * 1e3:.1f} ms, MFU {y_mfu:.1%}; train steps:']
  for t in steps:
    mfu = t['model_tflops'] * 1e12 / peak
    base = {**BEST, 'parallel.strategy': 'reference'}
    changed = {k: v for k, v in t['overrides'].items() if base.get(k) != v}
    out.append(
      f'  {t["step_s"] * 1e3:.1f} ms, MFU {mfu:.1%}, {mfu / y_mfu:.3f}x the yardstick '
      f'(the best row {"with " + str(changed) if changed else "as it is"})'
    )
  return out


if __name__ == '__main__':
  main()
