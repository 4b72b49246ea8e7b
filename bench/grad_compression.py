"""What parallel.grad_compression='topk' saves and costs: collective bytes and FLOPs per step.

Compiles the train step of one placement with the plain all-reduce and with top-K compression
at several `topk_fraction`s, on 16 fake CPU devices (or a compile-only GPU topology), and reads
from each compiled program: the collectives' bytes per device (`mas_jax/perf/hlo.py`, which
counts every all-gather, all-reduce, ... of the HLO) and the FLOPs of XLA's cost analysis (the
top-k selection and the scatter-add are the extra compute). On CPU it also times the step
(median of a few runs; 16 fake devices on a few cores, so only the difference means anything).
Writes docs/benchmarks/grad_compression_<strategy>.json and prints a markdown table.

  python bench/grad_compression.py                    # dp, the tiny model
  python bench/grad_compression.py --strategy=ma_sep  # ma_sep 12:4: its replicated parameters
  python bench/grad_compression.py --smoke            # -> grad_compression_dp_smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=16')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import command_line  # noqa: E402
from configs import tiny  # noqa: E402
from mas_jax import config as config_lib  # noqa: E402
from mas_jax import strategies, train_lib, zero  # noqa: E402
from mas_jax.perf import hlo  # noqa: E402

PLACEMENTS = {
  'dp': {'parallel.strategy': 'dp'},
  'ep': {'parallel.strategy': 'ep', 'parallel.ep': 8},
  'ma_sep': {'parallel.strategy': 'ma_sep', 'parallel.num_microbatches': 2},
}
BASE = {'data.source': 'synthetic', 'data.seq_len': 32, 'data.batch_size': 32}
# Bytes one device receives per byte of `hlo.collectives`' convention (the result on one
# device), with ring algorithms over a group of n: an all-reduce moves 2 (n - 1) / n of its
# buffer, an all-gather (n - 1) / n of its output, a reduce-scatter (n - 1) x its output.
RING = {
  'all-reduce': lambda n: 2 * (n - 1) / n,
  'all-gather': lambda n: (n - 1) / n,
  'reduce-scatter': lambda n: n - 1,
  'all-to-all': lambda n: (n - 1) / n,
  'collective-permute': lambda n: 1.0,
}


def _config(strategy: str, compression: str, fraction: float) -> config_lib.Config:
  cd = tiny.get_config()
  fields = {
    **BASE,
    **PLACEMENTS[strategy],
    'parallel.grad_compression': compression,
    'parallel.topk_fraction': fraction,
  }
  for dotted, value in fields.items():
    section, field = dotted.split('.')
    cd[section][field] = value
  return config_lib.from_config_dict(cd)


def measure(config: config_lib.Config, repeats: int) -> dict:
  """Collective bytes per device, FLOPs and (repeats > 0) the median step time of one step."""
  strategy = strategies.get(config)
  tx = train_lib.make_optimizer(config.train)
  layout = zero.ParamLayout(config, strategy)
  state, shardings = train_lib.create_train_state(layout, tx)
  step = train_lib.compile_train_step(config, layout, tx, shardings, state)
  collectives = hlo.collectives(step.as_text())
  by_kind: dict[str, float] = {}
  wire = 0.0
  for c in collectives:
    key = f'{c.kind}/{c.group}'
    by_kind[key] = by_kind.get(key, 0.0) + c.bytes
    wire += c.bytes * RING[c.kind](c.group)
  cost = step.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  row = {
    'collective_bytes': by_kind,
    'total_bytes': sum(by_kind.values()),
    'wire_bytes': wire,
    'flops': float(cost.get('flops', 0.0)),
  }
  if repeats:
    shape = (config.data.batch_size, config.data.seq_len + 1)
    batch = jax.device_put(
      np.random.default_rng(0).integers(0, config.model.vocab_size, shape, np.int32),
      strategy.batch_sharding(),
    )
    times = []
    for _ in range(repeats + 1):
      start = time.perf_counter()
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics['loss'])
      times.append(time.perf_counter() - start)
    row['step_ms'] = 1e3 * statistics.median(times[1:])
  return row


def table(result: dict) -> str:
  rows = result['rows']
  plain = rows[0]
  lines = [
    f'{result["strategy"]}, tiny model, {result["target"]}; per device per step, from the '
    'compiled HLO (`mas_jax/perf/hlo.py` convention: each result on one device)',
    '',
    '| compression | topk_fraction | HLO collective MB | by kind (MB) | received on a ring, MB | '
    'of plain | GFLOP | extra GFLOP | step ms (CPU) |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    kinds = ', '.join(f'{k} {v / 1e6:.3g}' for k, v in sorted(r['collective_bytes'].items()))
    step = f'{r["step_ms"]:.1f}' if 'step_ms' in r else '-'
    lines.append(
      f'| {r["compression"]} | {r["topk_fraction"] if r["compression"] == "topk" else "-"} | '
      f'{r["total_bytes"] / 1e6:.3g} | {kinds} | {r["wire_bytes"] / 1e6:.3g} | '
      f'{r["wire_bytes"] / plain["wire_bytes"]:.1%} | {r["flops"] / 1e9:.4g} | '
      f'{(r["flops"] - plain["flops"]) / 1e9:.3g} | {step} |'
    )
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--strategy', default='dp', choices=sorted(PLACEMENTS))
  parser.add_argument('--fractions', default='1.0,0.1,0.01', help='topk_fraction values')
  parser.add_argument('--repeats', type=int, default=5, help='timed steps (0: compile only)')
  parser.add_argument('--smoke', action='store_true', help='fraction 0.01 only; 1 timed step')
  parser.add_argument('--out', default=None, help='JSON path (default under docs/benchmarks)')
  args = parser.parse_args()
  fractions = [0.01] if args.smoke else [float(f) for f in args.fractions.split(',')]
  repeats = 1 if args.smoke else args.repeats
  suffix = '_smoke' if args.smoke else ''
  out = args.out or f'docs/benchmarks/grad_compression_{args.strategy}{suffix}.json'
  result = {
    'command': command_line(__file__),
    'target': f'{len(jax.devices())} x {jax.devices()[0].device_kind}',
    'strategy': args.strategy,
    'rows': [],
  }
  for compression, fraction in [('none', 0.01)] + [('topk', f) for f in fractions]:
    row = measure(_config(args.strategy, compression, fraction), repeats)
    result['rows'].append({'compression': compression, 'topk_fraction': fraction, **row})
    print(f'{compression} {fraction}: {row["total_bytes"] / 1e6:.3g} MB', flush=True)
  os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
  with open(out, 'w') as f:
    json.dump(result, f, indent=1)
  print(table(result))
  print(f'written to {out}')


if __name__ == '__main__':
  main()
