"""Held-out train steps for the performance model's validation (mas_jax/perf/validate.py).

One device call measures, in one process:
  1. the ceilings of bench/gpu_bench.py (per-call timing) and the same rates timed as a chain of
     calls (`hbm_chain_gbps`, `matmul_chain_tflops`: no host round trip per kernel);
  2. the kernel rows the calibration is built from, at bench/gpu_bench.py's shapes (8192 tokens):
     the cuDNN attention block at 32 heads, the expert FFN at 8 and 16 local experts;
  3. train steps at shapes no kernel row was timed at (other batches, accumulation, layer and
     expert counts, top-1, remat with dropless routing, a longer sequence), chosen and written
     here before any of them was measured, after the model's terms were committed
     (`model_fixed_at`).
The optimized HLO of the first train step is written beside the JSON (`--hlo`), to check the
elementwise term's byte count against the compiled program.

  python bench/heldout.py --model_fixed_at=<commit> --out=docs/benchmarks
  python bench/heldout.py --smoke --out=/tmp/heldout     # tiny shapes on CPU
  python bench/heldout.py --model_fixed_at=<commit> --row_set=c --kernel_scales=1,2 --name=heldout_c
  python bench/heldout.py --model_fixed_at=<commit> --row_set=d --kernel_scales=1,2 --name=heldout_d
The committed results: nvidia_h100_80gb_hbm3_heldout.json (call 1, all rows; rows 0 and 3 out of
memory at JAX's default memory fraction 0.75) and nvidia_h100_80gb_hbm3_heldout_b.json (call 2:
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 --no_kernels --rows=0,3,8 --name=heldout_b).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import gpu_bench  # noqa: E402
import grouped_matmul  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mas_jax import train_lib  # noqa: E402

BASE = {
  'parallel.num_microbatches': 1,
  'model.attention_impl': 'cudnn',
  'model.remat': 'none',
  'model.expert_dropout': 0.0,
}
# (layers, experts, top_k, seq, batch, accumulation, extra overrides), in order of interest:
# a cut-off call keeps the rows before it.
ROWS = [
  (2, 8, 2, 2048, 8, 1, {}),
  (1, 16, 2, 2048, 12, 1, {'model.expert_dropout': 0.1}),
  (1, 16, 2, 2048, 24, 3, {}),
  (2, 8, 2, 2048, 16, 2, {'model.dropless': True}),
  (1, 16, 2, 2048, 16, 1, {'model.remat': 'full', 'model.dropless': True}),
  (1, 16, 1, 2048, 8, 1, {'model.expert_dropout': 0.1}),
  (1, 16, 2, 4096, 6, 1, {}),
  (1, 16, 2, 2048, 48, 4, {'model.expert_dropout': 0.1}),
  # Added for a second call (after rows 0 and 3 ran out of JAX's default 75% of the memory):
  (2, 8, 2, 2048, 12, 2, {'model.expert_dropout': 0.1}),
]
# Third set (--row_set=c), chosen for the program with the gather dispatch and expert-major
# experts before any of it was measured: micro-batches of 16 sequences (the best row's) and
# around them, at accumulation counts, top-1, a longer sequence, 8 experts, dropless routing.
ROWS_C = [
  (1, 16, 2, 2048, 32, 2, {}),
  (1, 16, 2, 2048, 64, 4, {}),
  (1, 16, 2, 2048, 96, 6, {'model.expert_dropout': 0.1}),
  (1, 16, 1, 2048, 32, 2, {}),
  (1, 16, 2, 4096, 16, 2, {}),
  (1, 8, 2, 2048, 32, 2, {}),
  (1, 16, 2, 2048, 64, 4, {'model.dropless': True}),
]
# Fourth set (--row_set=d), chosen for session 10's changes before any of these rows was
# measured (the planner's terms for them committed first): the fused gradient accumulator at
# other accumulation counts, capacity routing on the grouped kernels (model.expert_impl=
# mosaic_gpu: the kept pairs only) at 16 and 8 experts and top-1, bf16 first moments, and dropless
# routing with the two-warpgroup weight gradient.
ROWS_D = [
  (1, 16, 2, 2048, 32, 2, {'train.fuse_grad_accum': True}),
  (1, 16, 2, 2048, 96, 6, {'train.fuse_grad_accum': True}),
  (1, 16, 2, 2048, 64, 4, {'model.expert_impl': 'mosaic_gpu'}),
  (1, 8, 2, 2048, 32, 2, {'model.expert_impl': 'mosaic_gpu'}),
  (1, 16, 1, 2048, 32, 2, {'model.expert_impl': 'mosaic_gpu'}),
  (1, 16, 2, 2048, 64, 4, {'train.mu_dtype': 'bfloat16'}),
  (1, 16, 2, 2048, 64, 4, {'model.dropless': True}),
]
ROW_SETS = {'ab': ROWS, 'c': ROWS_C, 'd': ROWS_D}


def overrides(layers, experts, top_k, seq, batch, accum, extra) -> dict:
  return {
    **BASE,
    'model.num_layers': layers,
    'model.num_experts': experts,
    'model.top_k': top_k,
    'data.seq_len': seq,
    'data.batch_size': batch,
    'train.grad_accum_steps': accum,
    **extra,
  }


SMOKE_ROW = {
  'model.d_model': 64,
  'model.num_heads': 4,
  'model.expert_hidden': 128,
  'model.vocab_size': 256,
  'model.compute_dtype': 'float32',
  'model.attention_impl': 'xla',
}


def chained_ceilings(s: dict) -> dict:
  n = s['matmul_n']
  keys = jax.random.split(jax.random.key(0), 2)
  a = jax.random.normal(keys[0], (n, n), jnp.bfloat16)
  b = jax.random.normal(keys[1], (n, n), jnp.bfloat16)
  mm = jax.jit(lambda x, y: (x @ y) * (1 / n**0.5))  # stays ~N(0, 1) along the chain
  t, _ = common.time_chain(lambda x: mm(x, b), [a], 20, warmup=50)
  return {
    'matmul_chain_tflops': 2 * n**3 / t / 1e12,
    'hbm_chain_gbps': common.hbm_copy_gbps(s['copy_elems']),
  }


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--smoke', action='store_true')
  parser.add_argument('--out', default='docs/benchmarks')
  parser.add_argument('--model_fixed_at', required=True, help='commit of the model under test')
  parser.add_argument('--hlo', action='store_true', help="write the first step's optimized HLO")
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--rows', default='', help='comma list of ROWS indices (default: all)')
  parser.add_argument(
    '--no_kernels', action='store_true', help='ceilings and train steps only (no kernel rows)'
  )
  parser.add_argument('--name', default='heldout', help='file-name suffix of the result')
  parser.add_argument(
    '--row_set', default='ab', choices=sorted(ROW_SETS), help='ROWS, ROWS_C or ROWS_D'
  )
  parser.add_argument(
    '--kernel_scales',
    default='1',
    help='comma list of c: kernel rows at c x the 8192-token (attention: batch-4) shape each, '
    'so that the calibration draws a line through two sizes instead of scaling one',
  )
  parser.add_argument(
    '--ffn_impls',
    default=','.join(grouped_matmul.FFN_IMPLS),
    help="comma list of the expert rows' implementations (bench/gpu_bench.py --ffn_impls)",
  )
  args = parser.parse_args()
  ffn_impls = grouped_matmul.parse_impls(args.ffn_impls, parser)
  try:
    scales = [int(c) for c in args.kernel_scales.split(',')]
  except ValueError:
    raise SystemExit(f'--kernel_scales={args.kernel_scales!r}: a comma list of integers') from None
  s = gpu_bench.SMOKE if args.smoke else gpu_bench.GPU
  device = jax.devices()[0].device_kind
  result = {
    'device': device,
    'jax': jax.__version__,
    'command': common.command_line(__file__),
    'model_fixed_at': args.model_fixed_at,
  }
  name = f'{common.device_stem(args.smoke)}_{args.name}'

  def save():
    common.write_result(args.out, name, result, gpu_bench.markdown(result))

  result['ceilings'] = {**gpu_bench.ceilings(s), **chained_ceilings(s)}
  print('ceilings', result['ceilings'], flush=True)
  result['attention'] = []
  result['expert_ffn'] = []
  result['train_step'] = []
  for c in [] if args.no_kernels else scales:
    sized = {**s, 'attn_batch': s['attn_batch'] * c, 'tokens': s['tokens'] * c}
    heads = {**sized, 'heads': s['heads'][-1:], 'attn_impls': s['attn_impls'][:1]}
    result['attention'] += gpu_bench.attention_sweep(heads)
    save()
    result['expert_ffn'] += gpu_bench.expert_sweep(
      {**sized, 'local_experts': s['local_experts'][-2:], 'ffn_impls': ffn_impls}
    )
    save()

  compiled = []
  compile_step = train_lib.compile_train_step

  def capture(*a, **k):
    step = compile_step(*a, **k)
    compiled.append(step)
    return step

  train_lib.compile_train_step = capture
  table = ROW_SETS[args.row_set]
  rows = [table[int(i)] for i in args.rows.split(',')] if args.rows else table
  rows = rows[:1] if args.smoke else rows
  for row in rows:
    o = overrides(*row)
    if args.smoke:
      o = {**o, **SMOKE_ROW, 'data.seq_len': 16, 'data.batch_size': 2, 'train.grad_accum_steps': 1}
    try:
      result['train_step'].append(gpu_bench.train_step(o, args.repeats))
    except Exception as e:  # noqa: BLE001  (out of memory, say: recorded, the rest still runs)
      result['train_step'].append({'overrides': o, 'error': str(e).splitlines()[0][:160]})
    print(result['train_step'][-1], flush=True)
    save()
    if args.hlo and len(compiled) == 1 and len(result['train_step']) == 1:
      with open(os.path.join(args.out, f'{name}_step0.hlo.txt'), 'w') as f:
        f.write(compiled[0].as_text())
  print(gpu_bench.markdown(result))


if __name__ == '__main__':
  main()
