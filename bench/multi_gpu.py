"""Multi-device comparison: MA Separation against TP x PP and EP on the same model and batch.

For every strategy of the list, on all local devices: the train step time (median), tokens/s,
MFU (datasheet bf16 peak), the per-device memory of the compiled step, ma_sep's per-role busy
ticks of its schedule, and the planner's prediction (`mas_jax.perf`) beside each measured
figure with the error. Same model (the seed's layer shapes, fewer layers), same global batch,
synthetic data. Writes docs/benchmarks/multi_gpu.json and multi_gpu.md.

  python bench/multi_gpu.py                   # on a machine with 8 GPUs (or any count)
  python bench/multi_gpu.py --smoke           # tiny shapes on 8 fake CPU devices
"""

from __future__ import annotations

import argparse
import os
import sys

if '--smoke' in sys.argv:
  os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
  )
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402

from configs import paper  # noqa: E402
from mas_jax import perf  # noqa: E402

GPU_MODEL = {'model.num_layers': 2, 'data.batch_size': 16}
SMOKE_MODEL = {
  'model.num_layers': 2,
  'model.d_model': 64,
  'model.num_heads': 8,
  'model.expert_hidden': 128,
  'model.vocab_size': 256,
  'data.batch_size': 8,
  'data.seq_len': 16,
  'model.compute_dtype': 'float32',
}


def strategy_list(n: int, model: dict) -> list[dict]:
  """ma_sep at the planner's split and at 3:1, tp_pp (n/2 x 2) and ep (n), as config overrides."""
  cd = paper.get_config()
  _apply(cd, model)
  spec = perf.ModelSpec.from_config(cd)
  hw = perf.load_hardware('h200')
  w = perf.Workload('train', cd.data.batch_size, cd.data.seq_len)
  best = next(p for p in perf.plan(spec, hw, w, n) if p.strategy == 'ma_sep')
  a_best = int(best.split.split(':')[0])
  out = [
    {
      'parallel.strategy': 'ma_sep',
      'parallel.attn_devices': a_best,
      'parallel.moe_devices': n - a_best,
      'parallel.num_microbatches': best.microbatches,
    }
  ]
  if 3 * n // 4 != a_best and cd.model.num_experts % (n // 4) == 0:
    out.append(
      {
        'parallel.strategy': 'ma_sep',
        'parallel.attn_devices': 3 * n // 4,
        'parallel.moe_devices': n // 4,
        'parallel.num_microbatches': 2,
      }
    )
  out.append(
    {
      'parallel.strategy': 'tp_pp',
      'parallel.tp': n // 2,
      'parallel.pp': 2,
      'parallel.num_microbatches': 4,
    }
  )
  out.append({'parallel.strategy': 'ep', 'parallel.ep': n, 'parallel.num_microbatches': 1})
  return out


def _apply(cd, overrides: dict) -> None:
  for dotted, value in overrides.items():
    section, field = dotted.split('.')
    cd[section][field] = value


def predict(cd, overrides: dict) -> perf.Prediction:
  kind = jax.devices()[0].device_kind.lower()
  hw = perf.load_hardware('h200' if 'h200' in kind else 'h100')
  return perf.predict_config(cd, hw, len(jax.devices()))


def measure(model: dict, overrides: dict, repeats: int) -> dict:
  row = common.time_train_step({**model, **overrides}, repeats, warmup=1)
  strategy = row.pop('strategy')
  cd = paper.get_config()
  _apply(cd, {**model, **overrides})
  if hasattr(strategy, 'ticks'):
    n = len(strategy.ticks)
    row['busy_ticks'] = {
      'attention': sum(x.attn is not None for x in strategy.ticks) / n,
      'experts': sum(x.moe is not None for x in strategy.ticks) / n,
    }
  pred = predict(cd, overrides)
  row['predicted'] = {
    'step_s': pred.step_s,
    'tokens_per_s': pred.tokens_per_s,
    'mfu': pred.mfu,
    'busy': pred.busy,
  }
  row['step_error'] = (pred.step_s - row['step_s']) / row['step_s']
  return row


def markdown(result: dict) -> str:
  out = [
    f'# {result["devices"]} x {result["device"]}, JAX {result["jax"]}',
    '',
    f'Command: `python {result["command"]}`; model overrides of configs/paper.py: '
    f'`{result["model"]}`',
    '',
    '| strategy | step ms (predicted, error) | tokens/s | MFU | memory GB/device | busy ticks |',
    '|---|---|---|---|---|---|',
  ]
  for r in result['rows']:
    o = r['overrides']
    name = o['parallel.strategy']
    if name == 'ma_sep':
      split = f'{o["parallel.attn_devices"]}:{o["parallel.moe_devices"]}'
      name += f' {split} M={o["parallel.num_microbatches"]}'
    elif name == 'tp_pp':
      name += f' {o["parallel.tp"]}x{o["parallel.pp"]}'
    else:
      name += f' {o["parallel.ep"]}'
    mfu = '-' if r['mfu'] is None else f'{r["mfu"]:.1%}'
    mem = '-' if r['memory_per_device_gb'] is None else f'{r["memory_per_device_gb"]:.3g}'
    busy = r.get('busy_ticks')
    busy = '-' if not busy else ', '.join(f'{k} {v:.0%}' for k, v in busy.items())
    out.append(
      f'| {name} | {r["step_s"] * 1e3:.1f} ({r["predicted"]["step_s"] * 1e3:.1f}, '
      f'{r["step_error"]:+.0%}) | {r["tokens_per_s"]:.0f} | {mfu} | {mem} | {busy} |'
    )
  return '\n'.join(out) + '\n'


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--smoke', action='store_true', help='tiny shapes, 8 fake CPU devices')
  parser.add_argument('--out', default='docs/benchmarks')
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  model = SMOKE_MODEL if args.smoke else GPU_MODEL
  n = len(jax.devices())
  result = {
    'device': jax.devices()[0].device_kind,
    'devices': n,
    'jax': jax.__version__,
    'command': ' '.join(sys.argv),
    'model': model,
    'rows': [],
  }
  rows = strategy_list(n, model)
  if args.smoke:  # one row per strategy (its code path): the second ma_sep split only on GPUs
    first = {}
    for r in rows:
      first.setdefault(r['parallel.strategy'], r)
    rows = list(first.values())
  for overrides in rows:
    result['rows'].append(measure(model, overrides, 1 if args.smoke else args.repeats))
    print(result['rows'][-1], flush=True)
  name = 'multi_gpu_smoke' if args.smoke else 'multi_gpu'
  table = markdown(result)
  common.write_result(args.out, name, result, table)
  print(table)


if __name__ == '__main__':
  main()
