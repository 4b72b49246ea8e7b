"""The planner's per-device memory beside the compiled train step's, per strategy.

Compiles each strategy's train step (compiled, never run) and reads its memory analysis:
arguments (parameters and optimizer state) and temporaries (gradients, activations, buffers),
beside the planner's `Memory` of the same placement (mas_jax/perf). With `--gpu_topology=1x1x16`
on a machine with one GPU attached, the compile targets 16 compile-only GPUs of that kind
(jax.experimental.topologies), so the figures are the GPU compiler's (cuDNN attention, bf16).
Without it, 16 fake CPU devices.

  python bench/planner_memory.py --gpu_topology=1x1x16      # the paper config, on a GPU machine
  python bench/planner_memory.py --smoke                     # the tiny config on CPU

Writes docs/benchmarks/planner_memory[_smoke].json and prints a markdown table.
"""

import argparse
import json
import os
import sys
import time

if '--gpu_topology' not in ' '.join(sys.argv):
  os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=16')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from configs import paper, tiny  # noqa: E402
from mas_jax import config as config_lib  # noqa: E402
from mas_jax import perf, strategies, train_lib  # noqa: E402

# The seed's 1024 x 2048 tokens per step through 16 accumulation chunks and full remat.
PAPER = {
  'model.compute_dtype': 'bfloat16',
  'model.attention_impl': 'cudnn',
  'model.remat': 'full',
  'train.grad_accum_steps': 16,
}
STRATEGIES = {
  'ma_sep 12:4': {'parallel.strategy': 'ma_sep', 'parallel.num_microbatches': 4},
  'tp_pp 8x2': {
    'parallel.strategy': 'tp_pp',
    'parallel.tp': 8,
    'parallel.pp': 2,
    'parallel.num_microbatches': 4,
  },
  'ep16': {'parallel.strategy': 'ep', 'parallel.ep': 16},
}


def _config(module, overrides):
  cd = module.get_config()
  for dotted, value in overrides.items():
    section, field = dotted.split('.')
    cd[section][field] = value
  return config_lib.from_config_dict(cd)


def _devices(topology: str | None):
  if not topology:
    return jax.devices()
  from jax._src.lib import xla_client
  from jax.experimental import topologies

  target = xla_client.get_topology_for_devices(jax.devices('gpu')).target_config
  desc = topologies.get_topology_desc(platform='cuda', target_config=target, topology=topology)
  return list(desc.devices)


def compiled_memory(config, devices):
  strategy = strategies.get(config, devices)
  return train_lib.compile_abstract_train_step(config, strategy).memory_analysis()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--gpu_topology', default=None, help="e.g. '1x1x16' (needs one GPU)")
  parser.add_argument('--smoke', action='store_true', help='the tiny config on CPU')
  args = parser.parse_args()
  devices = _devices(args.gpu_topology)
  module, base = (tiny, {}) if args.smoke else (paper, PAPER)
  hw = perf.HARDWARE['h100']
  rows = []
  for name, overrides in STRATEGIES.items():
    config = _config(module, {**base, **overrides})
    start = time.perf_counter()
    mem = compiled_memory(config, devices)
    seconds = time.perf_counter() - start
    pred = perf.predict_config(config, hw, len(devices))
    for role, m in pred.memory_by_role.items():
      rows.append(
        {
          'strategy': name,
          'role': role,
          'compile_s': round(seconds, 1),
          'compiled_arguments': mem.argument_size_in_bytes,
          'compiled_temporaries': mem.temp_size_in_bytes,
          'planner_state': m.state,
          'planner_grads_and_activations': m.grads + m.activations,
          'planner_accumulation': pred.accumulation,
        }
      )
    print(f'{name}: compiled in {seconds:.0f} s', flush=True)
  out = 'docs/benchmarks/planner_memory' + ('_smoke' if args.smoke else '') + '.json'
  os.makedirs(os.path.dirname(out), exist_ok=True)
  target = f'{args.gpu_topology} x {devices[0].device_kind}' if args.gpu_topology else 'CPU'
  result = {'command': ' '.join(['bench/planner_memory.py', *sys.argv[1:]]), 'target': target}
  with open(out, 'w') as f:
    json.dump({**result, 'rows': rows}, f, indent=1)
  gb = lambda x: f'{x / 1e9:.3g}'
  print(f'\n{target}; GB per device; written to {out}')
  print(
    '| strategy | role | compiled arguments | planner params + optimizer | compiled temporaries '
    '| planner grads + activations |'
  )
  print('|---|---|---|---|---|---|')
  for r in rows:
    print(
      f'| {r["strategy"]} | {r["role"]} | {gb(r["compiled_arguments"])} | '
      f'{gb(r["planner_state"])} | {gb(r["compiled_temporaries"])} | '
      f'{gb(r["planner_grads_and_activations"])} |'
    )


if __name__ == '__main__':
  main()
