"""Generation memory per device and role: weights and KV cache, held vs used, per strategy.

The seed's model (configs/paper.py: 4 layers, d_model 4096, 32 heads, 16 experts of 16384,
bf16 weights and cache) at context 2048 with 24 and 256 sequences, for ma_sep 12:4, tp_pp 8x2
and ep 16 on 16 devices. For ma_sep the last column gives what the plain one-program layout
(every device all its expert slots and a KV cache of its head slots, side by side) would hold,
against the arena that generation uses (`MASeparation.arena_layout`). Figures come from each
strategy's own buffer shapes and shardings (`Strategy.decode_memory_rows`; nothing is
allocated, so this runs on a CPU). A batch is padded
to the strategy's multiple as `mas_jax.decode.Generator` pads it. Writes
docs/benchmarks/decode_memory.json and .md.

  python bench/decode_memory.py [--smoke] [--out=PATH_PREFIX]
"""

import json
import os
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=16')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dataclasses  # noqa: E402

from configs import paper, tiny  # noqa: E402
from mas_jax import config as config_lib  # noqa: E402
from mas_jax import decode, strategies  # noqa: E402

STRATEGIES = {
  'ma_sep 12:4': dict(strategy='ma_sep', attn_devices=12, moe_devices=4, num_microbatches=1),
  'tp_pp 8x2': dict(strategy='tp_pp', tp=8, pp=2, num_microbatches=1),
  'ep 16': dict(strategy='ep', ep=16),
}


def rows_for(config, parallel: dict, batch: int, context: int) -> tuple[int, list[dict]]:
  config = dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, **parallel))
  padded = batch
  while True:  # the Generator's padding: the smallest batch the strategy takes
    try:
      strategy = strategies.get(decode.decode_config(config, padded))
    except config_lib.ConfigError:
      padded += 1
      continue
    if padded % strategy.decode_batch_multiple() == 0:
      rows = strategy.decode_memory_rows(context)
      if hasattr(strategy, 'arena_layout'):
        for r in rows:
          r['separate_held'] = separate_buffers(strategy, context)
      return padded, rows
    padded += 1


def separate_buffers(strategy, context: int) -> int:
  """ma_sep without the arena: every device would hold all its expert slots and a KV cache of
  head_slots heads side by side (the plain one-program layout)."""
  m = strategy.config.model
  itemsize = 2 if m.compute_dtype == 'bfloat16' else 4
  weights = strategy._param_bytes(itemsize)[0][0]
  return weights + 2 * strategy.arena_layout(context)['kv_rows'] * m.head_dim * itemsize


def main():
  smoke = '--smoke' in sys.argv
  module, batches, context = (tiny, (3, 16), 64) if smoke else (paper, (24, 256), 2048)
  cd = module.get_config()
  cd.model.compute_dtype = 'bfloat16'
  config = config_lib.from_config_dict(cd)
  results, tables = [], []
  for name, parallel in STRATEGIES.items():
    for batch in batches:
      padded, rows = rows_for(config, parallel, batch, context)
      results.append(
        {'strategy': name, 'batch': batch, 'padded_batch': padded, 'context': context, 'rows': rows}
      )
      first = {}  # one row per role: its first device
      for r in rows:
        first.setdefault(r['role'], r)
      tables.append((name, batch, padded, list(first.values())))
  out = next((a.split('=', 1)[1] for a in sys.argv if a.startswith('--out=')), None)
  out = out or 'docs/benchmarks/decode_memory'
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out + '.json', 'w') as f:
    json.dump(results, f, indent=1)
  lines = [
    f'Generation memory per device, {"tiny" if smoke else "paper"} config, bf16, context '
    f'{context} (`python bench/decode_memory.py`). One row per role: every device of a role '
    'holds the same.',
    '',
    '| strategy | batch (padded) | role | weights held / used (GB) | KV cache held / used (GB) '
    '| arena (GB) | total held (GB) | used / held | held with separate buffers (GB) |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  gb = lambda x: f'{x / 1e9:.3f}'
  for name, batch, padded, rows in tables:
    for r in rows:
      lines.append(
        f'| {name} | {batch} ({padded}) | {r["role"]} | {gb(r["weights_held"])} / '
        f'{gb(r["weights_used"])} | {gb(r["cache_held"])} / {gb(r["cache_used"])} | '
        f'{gb(r["arena_held"])} | {gb(r["held"])} | {r["efficiency"]:.1%} | '
        f'{gb(r.get("separate_held", r["held"]))} |'
      )
  text = '\n'.join(lines) + '\n'
  with open(out + '.md', 'w') as f:
    f.write(text)
  print(text)


if __name__ == '__main__':
  main()
