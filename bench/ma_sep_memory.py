"""Memory per device and role of MA Separation, for the tiny and the paper config.

Configs: tiny, paper as configured (1024 sequences in one step), and paper with
train.grad_accum_steps=16 and model.remat='full'. Parameters and AdamW moments come from the
parameter shapes and shardings (`jax.eval_shape`); activations from the compiled train step's
memory analysis on fake CPU devices (compiled, not run: nothing is allocated, so the paper model
compiles on a CPU). Writes docs/benchmarks/ma_sep_memory.json and prints a markdown table.

  python bench/ma_sep_memory.py [--skip_paper_compile]
  python bench/ma_sep_memory.py --smoke     # the tiny config only -> ma_sep_memory_smoke.json

bench/memory.py compiles every strategy's placement of the paper config, with and without
optimizer sharding, on the GPU topology too; this one gives the per-device rows of ma_sep.
"""

import json
import os
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=16')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from configs import paper, tiny  # noqa: E402
from mas_jax import config as config_lib  # noqa: E402
from mas_jax import strategies, train_lib  # noqa: E402


def activation_bytes(config, strategy) -> int:
  return train_lib.compile_abstract_train_step(config, strategy).memory_analysis()


def main():
  results = {}
  # The paper step as configured, and with 16 accumulation micro-batches and full remat.
  variants = (
    ('tiny', tiny, {}),
    ('paper', paper, {}),
    ('paper_accum16_remat', paper, {'train': {'grad_accum_steps': 16}, 'model': {'remat': 'full'}}),
  )
  smoke = '--smoke' in sys.argv
  for name, module, overrides in variants[:1] if smoke else variants:
    cd = module.get_config()
    cd.parallel.strategy = 'ma_sep'
    for section, fields in overrides.items():
      cd[section].update(fields)
    config = config_lib.from_config_dict(cd)
    strategy = strategies.get(config)
    mem = None
    if name == 'tiny' or '--skip_paper_compile' not in sys.argv:
      mem = activation_bytes(config, strategy)
    rows = strategy.memory_rows(None if mem is None else mem.temp_size_in_bytes)
    results[name] = {
      'split': '12:4',
      'num_microbatches': config.parallel.num_microbatches,
      'overrides': overrides,
      'rows': [
        {k: (float(v) if v is not None else None) if k != 'role' else v for k, v in r.items()}
        for r in rows
      ],
    }
  os.makedirs('docs/benchmarks', exist_ok=True)
  out = 'docs/benchmarks/ma_sep_memory' + ('_smoke' if smoke else '') + '.json'
  with open(out, 'w') as f:
    json.dump(results, f, indent=1)
  print(
    '| config | device | role | params + AdamW held (MB) | used by role (MB) | efficiency | '
    'activations (MB) |'
  )
  print('|---|---|---|---|---|---|---|')
  for name, res in results.items():
    for r in res['rows']:
      act = '-' if r['activations'] is None else f'{r["activations"] / 1e6:.4g}'
      print(
        f'| {name} | {int(r["device"])} | {r["role"]} | {r["state_held"] / 1e6:.4g} | '
        f'{r["state_used"] / 1e6:.4g} | {r["efficiency"]:.1%} | {act} |'
      )


if __name__ == '__main__':
  main()
