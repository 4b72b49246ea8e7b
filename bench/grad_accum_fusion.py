"""Gradient accumulation fused into the weight-gradient GEMM at the seed's expert shapes (issue 17).

With train.grad_accum_steps = A > 1 on one device, `train_lib.accumulate` runs the micro-batches
in a `lax.scan`; each one's backward writes bf16 weight gradients (the weights were cast to bf16
once per step), and a separate elementwise pass adds them into the float32 accumulator (the
'accumulate' scope of the H100 profile: 33.3 ms of a 727 ms step). Megatron-LM's "gradient
accumulation fusion" instead lets the weight-gradient matmul produce float32 and add it into the
accumulator itself (a cuBLAS GEMM with beta = 1).

This script times A = 4 micro-batches of the expert FFN (`moe.expert_ffn`'s expert-major batched
einsums, GELU; E = 16 experts of D -> F -> D; M capacity rows per expert and micro-batch), forward
and backward, over a stack of L such layers in a `lax.scan` (the model's layer scan), two ways:
  separate  bf16 weight gradients from autodiff, then acc + g.astype(f32) / A (today's trainer);
  fused     the library's train.fuse_grad_accum path: the custom-VJP expert matmul
            (`moe.sink_matmul`) takes the float32 accumulator as a "gradient sink" (`moe.GradSink`)
            and its backward returns sink + (x^T dy in float32) / A as the sink's cotangent, and no
            gradient for the bf16 weight; the accumulator is the scan's carry.
It checks that both accumulate the same gradients (relative difference: the bf16 rounding of the
separate path's per-micro-batch gradients), and reads XLA's optimized HLO of both: the cuBLAS
GEMM custom calls, their beta, output-to-operand aliasing, and the elementwise fusions that
write a float32 weight-shaped array (a separate read-modify-write of the accumulator).
Writes <out>/grad_accum_fusion.{json,md}.

  python bench/grad_accum_fusion.py --out docs/benchmarks    # on a GPU
  python bench/grad_accum_fusion.py --smoke --out /tmp/g     # tiny shapes on CPU (run by the tests)
  python bench/grad_accum_fusion.py --hlo_facts=HLO_DIR --out DIR  # the HLO facts of saved HLO
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mas_jax.layers import moe as moe_lib  # noqa: E402

# Cases (rows per expert and micro-batch, layers). 5120 rows: the best train row's micro-batch
# (16 sequences of 2048 tokens, top-2, 16 experts, capacity factor 1.25: 16 groups x 320 slots).
# Two layers (the layer scan slices the accumulator) at fewer rows, to fit 80 GB.
GPU = {'e': 16, 'd': 4096, 'f': 16384, 'cases': [(5120, 1), (2048, 2)], 'steps': 4, 'repeats': 8}
SMOKE = {'e': 2, 'd': 32, 'f': 64, 'cases': [(8, 1), (8, 2)], 'steps': 2, 'repeats': 1}


def ffn(x, w_in, w_out, sinks=None):
  """The library's expert FFN (`moe.expert_ffn`, expert-major, GELU) on x[E, M, D]."""
  e, m, d = x.shape
  y = moe_lib.expert_ffn(x.reshape(e, 1, m, d), w_in, w_out, 'gelu', expert_major=True, sinks=sinks)
  return y.reshape(e, m, d)


def layers(layer_fn, x, stacked):
  """The model's layer scan: x through L layers whose arrays are stacked [L, ...]."""
  return jax.lax.scan(lambda x, p: (x + layer_fn(x, *p), None), x, stacked)[0]


# ---------------------------------------------------------------------------------------------
# The two accumulation loops.
# ---------------------------------------------------------------------------------------------


def separate_step(w, xs, cots):
  """Today's trainer: bf16 gradients of the bf16 weights, then acc + g.astype(f32) / A."""
  steps = xs.shape[0]

  def loss(w, x, cot):
    return jnp.vdot(layers(ffn, x, w), cot).astype(jnp.float32)

  def body(acc, inputs):
    g = jax.grad(loss)(w, *inputs)
    with jax.named_scope('accumulate'):
      return jax.tree.map(lambda a, g: a + g.astype(a.dtype) / steps, acc, g), None

  zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), w)
  return jax.lax.scan(body, zeros, (xs, cots))[0]


def fused_step(w, xs, cots):
  """The accumulator as every expert matmul's gradient sink; its gradient is the new one."""
  steps = xs.shape[0]

  def loss(sinks, x, cot):
    def layer(x, w_in, w_out, s_in, s_out):
      return ffn(
        x, w_in, w_out, (moe_lib.GradSink(s_in, 1 / steps), moe_lib.GradSink(s_out, 1 / steps))
      )

    return jnp.vdot(layers(layer, x, (*w, *sinks)), cot).astype(jnp.float32)

  def body(acc, inputs):
    return jax.grad(loss)(acc, *inputs), None

  zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), w)
  return jax.lax.scan(body, zeros, (xs, cots))[0]


# ---------------------------------------------------------------------------------------------
# What XLA made of it.
# ---------------------------------------------------------------------------------------------


def hlo_facts(text: str, weight_shapes: list[str]) -> dict:
  """Counts in optimized HLO text: cuBLAS GEMM custom calls (and their beta and aliasing),
  Triton GEMM fusions, and non-GEMM fusions other than the zero initialisation whose result is a
  float32 weight-shaped array (with or without a leading layer axis)."""
  weight = re.compile('|'.join(rf'f32\[(\d+,)*{re.escape(s)}\]' for s in weight_shapes))
  lines = text.splitlines()
  gemms = [ln for ln in lines if 'custom_call_target="__cublas$' in ln]
  betas = [float(m.group(1)) for ln in gemms if (m := re.search(r'"beta":([-0-9.e]+)', ln))]
  weight_gemms = [ln for ln in gemms if weight.search(ln.split('custom-call(')[0])]
  rmw = [
    ln.strip()[:200]
    for ln in lines
    if ' fusion(' in ln
    and '__triton_gemm' not in ln
    and 'broadcast' not in ln.split('=')[0]  # the zero initialisation of the accumulator
    and weight.search(ln.split(' fusion(')[0])
  ]
  return {
    'cublas_gemms': len(gemms),
    'cublas_gemms_beta_1': sum(b == 1.0 for b in betas),
    'cublas_gemms_aliased_to_operand': sum('output_to_operand_aliasing' in ln for ln in gemms),
    'f32_weight_shaped_gemms': len(weight_gemms),
    'f32_weight_shaped_gemms_beta_1': sum('"beta":1,' in ln for ln in weight_gemms),
    'f32_weight_shaped_gemm_lines': [ln.strip()[:600] for ln in weight_gemms],
    'triton_gemm_fusions': text.count('"kind":"__triton_gemm"'),
    'f32_weight_shaped_fusions': rmw,
  }


def case(s: dict, rows: int, num_layers: int, hlo_out: str = '') -> dict:
  e, d, f, a = s['e'], s['d'], s['f'], s['steps']
  k = jax.random.split(jax.random.key(rows * 10 + num_layers), 4)
  dtype = jnp.float32 if s['smoke'] else jnp.bfloat16
  w = (
    (jax.random.normal(k[0], (num_layers, e, d, f), jnp.float32) / d**0.5).astype(dtype),
    (jax.random.normal(k[1], (num_layers, e, f, d), jnp.float32) / f**0.5).astype(dtype),
  )
  xs = jax.random.normal(k[2], (a, e, rows, d), dtype)
  cots = jax.random.normal(k[3], (a, e, rows, d), dtype)
  row = {'rows': rows, 'layers': num_layers, 'steps': a}
  shapes = [f'{e},{d},{f}', f'{e},{f},{d}']
  compiled = {}
  for name, fn in (('separate', separate_step), ('fused', fused_step)):
    compiled[name] = jax.jit(fn).lower(w, xs, cots).compile()
    text = compiled[name].as_text()
    row[f'{name}_hlo'] = hlo_facts(text, shapes)
    if hlo_out:
      os.makedirs(hlo_out, exist_ok=True)
      with open(os.path.join(hlo_out, f'{name}_m{rows}_l{num_layers}.hlo.txt'), 'w') as fh:
        fh.write(text)
    # Timed with no other accumulator alive (two layers' float32 sums are 17 GB each).
    row[f'{name}_ms'] = common.bench(compiled[name], w, xs, cots, repeats=s['repeats']) * 1e3
    mem = compiled[name].memory_analysis()
    row[f'{name}_temp_gb'] = None if mem is None else mem.temp_size_in_bytes / 1e9
  # On the device: the host would need several copies of the float32 accumulators.
  sq = jax.jit(lambda a, b: sum(jnp.sum(jnp.square(x - y)) for x, y in zip(a, b, strict=True)))
  try:
    ref = compiled['separate'](w, xs, cots)
    norm = float(sq(ref, (0.0, 0.0)))
    row['rel_diff'] = float(np.sqrt(float(sq(compiled['fused'](w, xs, cots), ref)) / norm))
  except jax.errors.JaxRuntimeError as err:  # both sums and a step's temporaries may not fit
    row['rel_diff'] = None
    row['rel_diff_error'] = str(err).splitlines()[0][:160]
  # Per micro-batch and layer: the weight-gradient GEMMs' FLOPs; the separate pass's bytes.
  params = 2 * e * d * f * num_layers
  row['weight_params'] = params
  row['separate_accumulate_bytes'] = a * params * (2 + 4 + 4)  # read g, read acc, write acc
  row['saved_ms'] = row['separate_ms'] - row['fused_ms']
  print({k: v for k, v in row.items() if not k.endswith('_hlo')}, flush=True)
  return row


def markdown(r: dict) -> str:
  lines = [
    f'# Gradient accumulation fused into the weight-gradient GEMM on {r["device"]}, JAX {r["jax"]}',
    '',
    f'Command: `{common.shell_command(r["command"])}`. {r["cases"][0]["steps"]} micro-batches '
    'of the expert FFN (E experts of D -> F -> D, expert-major batched einsums, GELU) in a '
    '`lax.scan`, forward + backward over L layers (a layer scan), the float32 accumulator of the '
    f'bf16 expert weights as the carry; E={r["shape"]["e"]}, D={r["shape"]["d"]}, '
    f'F={r["shape"]["f"]}. ms per step (median of {r["shape"]["repeats"]}); HLO: cuBLAS GEMMs '
    'writing a float32 weight-shaped array with beta = 1 (of all such GEMMs), and other fusions '
    'writing one (the zero initialisation aside).',
    '',
    '| rows per expert | layers | separate ms | fused ms | saved ms | fused / separate '
    '| separate: beta=1 GEMMs, f32 weight fusions | fused: beta=1 GEMMs, f32 weight fusions '
    '| rel. diff of the gradients |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  for c in r['cases']:
    sh, fh = c['separate_hlo'], c['fused_hlo']
    lines.append(
      f'| {c["rows"]} | {c["layers"]} | {c["separate_ms"]:.2f} | {c["fused_ms"]:.2f} | '
      f'{c["saved_ms"]:.2f} | {c["fused_ms"] / c["separate_ms"]:.3f} | '
      f'{sh["f32_weight_shaped_gemms_beta_1"]} of {sh["f32_weight_shaped_gemms"]}, '
      f'{len(sh["f32_weight_shaped_fusions"])} | '
      f'{fh["f32_weight_shaped_gemms_beta_1"]} of {fh["f32_weight_shaped_gemms"]}, '
      f'{len(fh["f32_weight_shaped_fusions"])} | '
      f'{"out of memory" if c["rel_diff"] is None else format(c["rel_diff"], ".1e")} |'
    )
  return '\n'.join(lines) + '\n'


def write_hlo_facts(hlo_dir: str, out: str) -> None:
  """`hlo_facts` of every saved HLO file (the GPU shapes), to <out>/hlo_facts.json."""
  shapes = [f'{GPU["e"]},{GPU["d"]},{GPU["f"]}', f'{GPU["e"]},{GPU["f"]},{GPU["d"]}']
  facts = {'command': common.command_line(__file__)}
  for name in sorted(os.listdir(hlo_dir)):
    if name.endswith(('.hlo.txt', '.hlo.txt.gz')):
      opener = gzip.open if name.endswith('.gz') else open
      with opener(os.path.join(hlo_dir, name), 'rt') as f:
        facts[name.split('.')[0]] = hlo_facts(f.read(), shapes)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'hlo_facts.json'), 'w') as f:
    json.dump(facts, f, indent=1)
  for name, r in facts.items():
    if name != 'command':
      print(
        f'{name}: {r["f32_weight_shaped_gemms_beta_1"]} of {r["f32_weight_shaped_gemms"]} float32 '
        f'weight-shaped cuBLAS GEMMs with beta=1 ({r["cublas_gemms"]} GEMMs in all); '
        f'{len(r["f32_weight_shaped_fusions"])} other fusions writing a float32 weight-shaped array'
      )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--smoke', action='store_true', help='tiny shapes (CPU smoke test)')
  parser.add_argument('--out', default='docs/benchmarks')
  parser.add_argument('--cases', default='', help='ROWSxLAYERS,... (default: 5120x1,2048x2)')
  parser.add_argument(
    '--hlo_facts',
    metavar='HLO_DIR',
    help='measure nothing: write hlo_facts.json of the *.hlo.txt[.gz] files --hlo_out wrote',
  )
  parser.add_argument('--hlo_out', default='', help="also write each case's optimized HLO here")
  args = parser.parse_args()
  if args.hlo_facts:
    write_hlo_facts(args.hlo_facts, args.out)
    return
  s = {**(SMOKE if args.smoke else GPU), 'smoke': args.smoke}
  if args.cases:
    s['cases'] = [tuple(int(n) for n in c.split('x')) for c in args.cases.split(',')]
  result = {
    'command': common.command_line(__file__),
    'device': jax.devices()[0].device_kind,
    'jax': jax.__version__,
    'shape': {k: s[k] for k in ('e', 'd', 'f', 'steps', 'repeats')},
    'cases': [case(s, m, n, args.hlo_out) for m, n in s['cases']],
  }
  common.write_result(args.out, 'grad_accum_fusion', result, markdown(result))
  print(markdown(result))


if __name__ == '__main__':
  main()
