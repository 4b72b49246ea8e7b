"""Few-head attention: one fused QKV matmul against three, at the seed's shapes (issue 17).

ma_sep's attention devices of a 12:4 split run 3 of the 32 heads, where the q, k and v
projections are [tokens, 4096] x [4096, 384] matmuls, narrow for a GPU. This script times the
attention block (`mas_jax.layers.attention.attention`: QKV projection, RoPE, cuDNN causal
attention, output projection) forward and forward + backward as the library runs it, and with
the three projections fused into one [4096, 3 x heads x 128] matmul (the weights concatenated in
the step, the result split), at 3 and 32 heads and at 4 and 16 sequences of 2048 tokens. Both
variants are timed as chains of back-to-back calls (`common.time_chain`); the fused one is
checked against the library's output first.
Writes <out>/qkv_fusion.{json,md}.

  python bench/qkv_fusion.py --out docs/benchmarks    # on a GPU
  python bench/qkv_fusion.py --smoke --out /tmp/q     # tiny shapes on CPU (run by the tests)
"""

from __future__ import annotations

import argparse
import os
import sys

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
  return '\n'.join(lines) + '\n'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--smoke', action='store_true', help='tiny shapes (CPU smoke test)')
  parser.add_argument('--out', default='docs/benchmarks')
  args = parser.parse_args()
  s = {**(SMOKE if args.smoke else GPU), 'smoke': args.smoke}
  result = {
    'command': common.command_line(__file__),
    'device': jax.devices()[0].device_kind,
    'jax': jax.__version__,
    'cases': [case(s, h, b) for h in s['heads'] for b in s['batches']],
  }
  common.write_result(args.out, 'qkv_fusion', result, markdown(result))
  print(markdown(result))


if __name__ == '__main__':
  main()
