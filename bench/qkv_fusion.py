"""Few-head attention: one fused QKV matmul against three, at the seed's shapes (issue 17).

ma_sep's attention devices of a 12:4 split run 3 of the 32 heads, where the q, k and v
projections are [tokens, 4096] x [4096, 384] matmuls, narrow for a GPU. This script times the
attention block (`mas_jax.layers.attention.attention`: QKV projection, RoPE, cuDNN causal
attention, output projection) forward and forward + backward as the library runs it, and with
the three projections fused into one [4096, 3 x heads x 128] matmul (the weights concatenated in
the step, the result split), at 3 and 32 heads and at 4 and 16 sequences of 2048 tokens. Both
variants are timed as chains of back-to-back calls (`common.time_chain`); the fused one is
checked against the library's output first.

With --flag_sets every case runs again under each set of XLA flags (one child process per set,
the flags in its XLA_FLAGS): by default XLA's defaults and the GEMM-library switches that can
change how the narrow projections and the attention run (cuDNN GEMM fusions, cuBLASLt, no Triton
GEMMs, no command buffers). A set the backend rejects is recorded with its error.
Writes <out>/qkv_fusion.{json,md}.

  python bench/qkv_fusion.py --out docs/benchmarks    # on a GPU
  python bench/qkv_fusion.py --flag_sets=default --out docs/benchmarks   # the XLA flag sets
  python bench/qkv_fusion.py --smoke --out /tmp/q     # tiny shapes on CPU (run by the tests)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mas_jax.layers import attention as attn_lib  # noqa: E402

GPU = {'d': 4096, 'seq': 2048, 'heads': [3, 32], 'batches': [4, 16], 'impl': 'cudnn', 'calls': 10}
SMOKE = {'d': 64, 'seq': 16, 'heads': [2], 'batches': [2], 'impl': 'xla', 'calls': 2}
HEAD_DIM = 128
# --flag_sets=default: XLA's defaults first (the main table, and the row the others are
# compared with), then one switch each.
FLAG_SETS = (
  '',
  '--xla_gpu_cudnn_gemm_fusion_level=2',
  '--xla_gpu_enable_cublaslt=true',
  '--xla_gpu_enable_triton_gemm=false',
  '--xla_gpu_enable_command_buffer=',
)


def fused_attention(x, p, positions, rope_base, implementation):
  """`attn_lib.attention` with q, k and v from one matmul over the concatenated weights."""
  n = p['wq'].shape[1]
  w = jnp.concatenate([p['wq'], p['wk'], p['wv']], axis=1).astype(x.dtype)  # [D, 3N, H]
  qkv = jnp.einsum('BTD,DNH->BTNH', x, w)
  q, k, v = qkv[:, :, :n], qkv[:, :, n : 2 * n], qkv[:, :, 2 * n :]
  q, k = attn_lib.rope(q, positions, rope_base), attn_lib.rope(k, positions, rope_base)
  o = attn_lib.causal_attention(q, k, v, implementation)
  return attn_lib.output_projection(o, p['wo'])


def case(s: dict, heads: int, batch: int) -> dict:
  d, seq, hd = s['d'], s['seq'], HEAD_DIM if not s['smoke'] else 8
  keys = jax.random.split(jax.random.key(heads * 100 + batch), 5)
  p = {
    n: jax.random.normal(k, (d, heads, hd), jnp.float32) / d**0.5
    for n, k in zip(('wq', 'wk', 'wv'), keys[:3], strict=True)
  }
  p['wo'] = jax.random.normal(keys[3], (heads, hd, d), jnp.float32) / d**0.5
  dtype = jnp.float32 if s['smoke'] else jnp.bfloat16
  x = jax.random.normal(keys[4], (batch, seq, d), dtype)
  cot = jax.random.normal(jax.random.key(7), x.shape, dtype)
  positions = jnp.arange(seq)
  row = {'heads': heads, 'batch': batch, 'seq': seq}
  proj = 2 * batch * seq * d * heads * hd * 4
  core = 2 * 2 * batch * heads * seq * seq * hd / 2  # causal half
  outs = {}
  for name, fn in (('separate', attn_lib.attention), ('fused', fused_attention)):
    fwd = jax.jit(lambda p, x, fn=fn: fn(x, p, positions, 1e4, implementation=s['impl']))
    grad = jax.jit(
      jax.value_and_grad(lambda p, x, f=fwd: jnp.vdot(f(p, x), cot).astype(jnp.float32), (0, 1))
    )
    outs[name] = np.asarray(fwd(p, x).astype(jnp.float32))
    # Each call's input is the previous call's output (x's gradient for the backward), so the
    # chain waits for the device's work, not for the dispatch.
    tf, _ = common.time_chain(lambda a, f=fwd: f(p, a), [x], s['calls'])
    tb, _ = common.time_chain(lambda a, g=grad: g(p, a)[1][1], [x], s['calls'])
    row[f'{name}_fwd_ms'] = tf * 1e3
    row[f'{name}_fwd_bwd_ms'] = tb * 1e3
    row[f'{name}_fwd_tflops'] = (proj + core) / tf / 1e12
    row[f'{name}_fwd_bwd_tflops'] = 3 * (proj + core) / tb / 1e12
  scale = float(np.max(np.abs(outs['separate'])))
  row['max_rel_diff'] = float(np.max(np.abs(outs['fused'] - outs['separate']))) / scale
  print(row, flush=True)
  return row


def markdown(r: dict) -> str:
  lines = [
    f'# Fused QKV projection on {r["device"]}, JAX {r["jax"]}',
    '',
    f'Command: `{common.shell_command(r["command"])}`. Attention block (QKV, RoPE, causal '
    'attention, output projection), ms per call from chains of calls; TFLOP/s of forward + '
    'backward count three forwards.',
    '',
    '| heads | sequences | separate fwd ms | fused fwd ms | separate fwd+bwd ms | fused fwd+bwd ms '
    '| fused / separate, fwd+bwd | max rel. diff |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for c in r['cases']:
    lines.append(
      f'| {c["heads"]} | {c["batch"]} | {c["separate_fwd_ms"]:.3f} | {c["fused_fwd_ms"]:.3f} | '
      f'{c["separate_fwd_bwd_ms"]:.3f} | {c["fused_fwd_bwd_ms"]:.3f} | '
      f'{c["fused_fwd_bwd_ms"] / c["separate_fwd_bwd_ms"]:.3f} | {c["max_rel_diff"]:.1e} |'
    )
  if r.get('flag_sets'):
    lines += flag_table(r['flag_sets'])
  return '\n'.join(lines) + '\n'


def flag_table(sets: list[dict]) -> list[str]:
  """Markdown lines of the XLA flag sets: each case's forward + backward against the first set's."""
  base = {(c['heads'], c['batch']): c for c in sets[0].get('cases', [])}
  lines = [
    '',
    '## XLA flag sets',
    '',
    'Forward + backward ms per call under each set of XLA_FLAGS (one process per set), and the '
    'ratio to the first set at the same heads and sequences.',
    '',
    '| XLA_FLAGS | heads | sequences | separate fwd+bwd ms | ratio | fused fwd+bwd ms | ratio | '
    'TFLOP/s (separate) |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for fs in sets:
    flags = f'`{fs["xla_flags"]}`' if fs['xla_flags'] else '(defaults)'
    if 'error' in fs:
      lines.append(f'| {flags} | error: {fs["error"]} | | | | | | |')
      continue
    for c in fs['cases']:
      b = base.get((c['heads'], c['batch']))
      ratio = lambda k, c=c, b=b: f'{c[k] / b[k]:.3f}' if b else ''
      lines.append(
        f'| {flags} | {c["heads"]} | {c["batch"]} | {c["separate_fwd_bwd_ms"]:.3f} | '
        f'{ratio("separate_fwd_bwd_ms")} | {c["fused_fwd_bwd_ms"]:.3f} | '
        f'{ratio("fused_fwd_bwd_ms")} | {c["separate_fwd_bwd_tflops"]:.0f} |'
      )
  return lines


def run_flag_set(flags: str, smoke: bool) -> dict:
  """The cases in a child process with XLA_FLAGS=flags: {'xla_flags', 'cases'} or {.., 'error'}."""
  with tempfile.TemporaryDirectory() as tmp:
    cmd = [sys.executable, os.path.abspath(__file__), '--out', tmp, *(['--smoke'] * smoke)]
    env = {**os.environ, 'XLA_FLAGS': f'{os.environ.get("XLA_FLAGS", "")} {flags}'.strip()}
    print(f'XLA_FLAGS={env["XLA_FLAGS"]!r}', flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
      tail = (proc.stderr or proc.stdout).strip().splitlines() or [f'exit {proc.returncode}']
      return {'xla_flags': flags, 'error': tail[-1][:200]}
    with open(os.path.join(tmp, 'qkv_fusion.json')) as f:
      child = json.load(f)
    return {'xla_flags': flags, **{k: child[k] for k in ('device', 'jax', 'cases')}}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--smoke', action='store_true', help='tiny shapes (CPU smoke test)')
  parser.add_argument('--out', default='docs/benchmarks')
  parser.add_argument(
    '--flag_sets',
    default='',
    help="';'-separated XLA flag sets to run the cases under, each in its own process "
    "('' in the list: the defaults), or 'default' for FLAG_SETS; empty: this process only",
  )
  args = parser.parse_args()
  s = {**(SMOKE if args.smoke else GPU), 'smoke': args.smoke}
  result = {'command': common.command_line(__file__)}
  if args.flag_sets:
    # This process leaves the device alone (JAX would take most of its memory); the children
    # run the cases, and the first set's are the main table.
    sets = FLAG_SETS if args.flag_sets == 'default' else args.flag_sets.split(';')
    result['flag_sets'] = [run_flag_set(f.strip(), args.smoke) for f in sets]
    first = next((fs for fs in result['flag_sets'] if 'cases' in fs), None)
    if first is None:
      raise SystemExit(f'every flag set failed: {result["flag_sets"]}')
    result.update(device=first['device'], jax=first['jax'], cases=first['cases'])
  else:
    result['device'] = jax.devices()[0].device_kind
    result['jax'] = jax.__version__
    result['cases'] = [case(s, h, b) for h in s['heads'] for b in s['batches']]
  common.write_result(args.out, 'qkv_fusion', result, markdown(result))
  print(markdown(result))


if __name__ == '__main__':
  main()
