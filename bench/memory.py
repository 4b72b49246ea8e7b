"""Memory per device and role of the seed model's train step on 16 devices, every strategy.

Each placement's train step is compiled (never run) from the state's shapes, with and without
`parallel.shard_optimizer`, at the seed's 1024 x 2048 tokens per step through 16 accumulation
chunks and full remat. Per row:
  - params, optimizer: bytes of the float32 master weights and AdamW moments one device holds
    (the state's shardings); their used share by role (ma_sep's dummy slots are held, unused);
  - compute copy: with shard_optimizer, the compute-dtype weights the step gathers into the
    strategy's layout (dummy slots included), part of the temporaries;
  - gradients: the float32 accumulator, one per held master weight (with shard_gradients=False
    one per weight of the strategy layout), part of the temporaries;
  - temporaries: the compiled step's (gradients, activations, compute copy, update buffers);
  - total = compiled arguments + temporaries; efficiency = used / held state; fits 80 GB;
  - the planner's temporaries (gradients + activations) of the same placement, beside them;
  - the step's collectives from the compiled HLO, bytes per device by kind and group size.
With `--gpu_topology=1x1x16` on a machine with one GPU, the compile targets 16 compile-only GPUs
of that kind (the GPU compiler's figures, cuDNN attention); without it 16 fake CPU devices
(XLA attention; the CPU compiler).

  python bench/memory.py --gpu_topology=1x1x16     # on a GPU machine
  python bench/memory.py                           # CPU compile (minutes per placement)
  python bench/memory.py --smoke                   # the tiny config, two placements

Writes docs/benchmarks/memory[_cpu|_smoke].json and prints a markdown table.
"""

import argparse
import dataclasses
import json
import os
import sys
import time

if '--gpu_topology' not in ' '.join(sys.argv):
  os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=16')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from planner_memory import _config, _devices  # noqa: E402

from configs import paper, tiny  # noqa: E402
from mas_jax import perf, strategies, train_lib, zero  # noqa: E402
from mas_jax.perf import hlo  # noqa: E402

GPU_MEMORY = 80e9  # an H100's HBM, the seed's A100-80GB too
PAPER = {
  'model.compute_dtype': 'bfloat16',
  'model.remat': 'full',
  'train.grad_accum_steps': 16,
  'parallel.hardware': 'h100',
}
PLACEMENTS = {
  'ma_sep 12:4': {'parallel.strategy': 'ma_sep', 'parallel.num_microbatches': 4},
  # Gradients accumulated in the compute layout and moved once per step (ZeRO-1), sharded only.
  'ma_sep 12:4 shard_gradients=False': {
    'parallel.strategy': 'ma_sep',
    'parallel.num_microbatches': 4,
    'parallel.shard_gradients': False,
  },
  # Data-parallel attention: every device holds all heads (16 sequences per micro-batch: 2 slots
  # on each of the 12 attention devices).
  'ma_sep 12:4 attn_sharding=batch': {
    'parallel.strategy': 'ma_sep',
    'parallel.num_microbatches': 4,
    'parallel.attn_sharding': 'batch',
  },
  'ma_sep best': {
    'parallel.strategy': 'ma_sep',
    'parallel.attn_devices': 'auto',
    'parallel.moe_devices': 'auto',
    'parallel.num_microbatches': 4,
  },
  'tp_pp 8x2 gpipe': {
    'parallel.strategy': 'tp_pp',
    'parallel.tp': 8,
    'parallel.pp': 2,
    'parallel.num_microbatches': 4,
    'parallel.pp_schedule': 'gpipe',
  },
  'tp_pp 8x2 1f1b': {
    'parallel.strategy': 'tp_pp',
    'parallel.tp': 8,
    'parallel.pp': 2,
    'parallel.num_microbatches': 4,
    'parallel.pp_schedule': '1f1b',
  },
  'ep16': {'parallel.strategy': 'ep', 'parallel.ep': 16},
  'ep8 x dp2': {'parallel.strategy': 'ep', 'parallel.ep': 8},
}
SMOKE = ('ma_sep 12:4', 'ep16')


def _bytes_per_device(tree) -> int:
  """Bytes of one device's shard of every array in `tree` (abstract, with shardings)."""
  return sum(
    int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize for a in jax.tree.leaves(tree)
  )


def _collective_bytes(text: str) -> dict[str, float] | None:
  """Bytes per device of one step's collectives by 'kind/group' (mas_jax.perf.hlo), or None
  when the HLO holds a loop of unknown trip count (the CPU compiler's widened loops)."""
  try:
    items = hlo.collectives(text)
  except ValueError:
    return None
  out: dict[str, float] = {}
  for c in items:
    key = f'{c.kind}/{c.group}'
    out[key] = out.get(key, 0.0) + c.bytes
  return out


def rows_of(config, devices, name: str) -> list[dict]:
  """One row per role: the state's bytes from its shardings, the compiled step's memory."""
  strategy = strategies.get(config, devices)
  layout = zero.ParamLayout(config, strategy)
  tx = train_lib.make_optimizer(config.train)
  state = train_lib.abstract_state(layout, tx)
  params = _bytes_per_device(state['params'])
  optimizer = _bytes_per_device(state['opt_state'])
  # The float32 accumulator: one per master weight, or with shard_gradients=False (ZeRO-1) one
  # per weight of the strategy layout.
  grads = params
  if layout.sharded and not config.parallel.shard_gradients:
    grads = _bytes_per_device(
      train_lib.abstract_state(
        zero.ParamLayout(
          dataclasses.replace(
            config, parallel=dataclasses.replace(config.parallel, shard_optimizer=False)
          ),
          strategy,
        ),
        tx,
      )['params']
    )
  grads = grads if config.train.grad_accum_steps > 1 else 0
  start = time.perf_counter()
  compiled = train_lib.compile_abstract_train_step(config, strategy)
  seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  collectives = _collective_bytes(compiled.as_text())
  # Used state by role: ma_sep's unsharded layout holds dummy slots (Strategy.memory_rows);
  # everything else every device holds it also updates.
  roles: dict[str, list[float]] = {}
  compute_by_role: dict[str, tuple[float, float]] = {}
  if config.parallel.strategy == 'ma_sep':
    per_device = strategy.memory_rows()
    copy = strategy._param_bytes(itemsize=2 if config.model.compute_dtype == 'bfloat16' else 4)
    for r, (held, used) in zip(per_device, copy, strict=True):
      eff = 1.0 if layout.sharded else r['state_used'] / r['state_held']
      roles.setdefault(r['role'], []).append(eff)
      compute_by_role.setdefault(r['role'], (held, used))
  else:
    roles['all'] = [1.0]
    itemsize = 2 if config.model.compute_dtype == 'bfloat16' else 4
    abstract = jax.eval_shape(strategy.from_reference, layout.abstract())
    shardings = strategy.param_shardings(abstract)
    copy = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    held = _bytes_per_device(copy) // 4 * itemsize
    compute_by_role['all'] = (held, held)
  predicted = perf.predict_config(config, perf.HARDWARE['h100'], len(devices)).memory_by_role
  out = []
  for role, effs in roles.items():
    planner = predicted['experts' if role == 'expert' else role]
    copy_held, copy_used = compute_by_role[role] if layout.sharded else (0, 0)
    total = mem.argument_size_in_bytes + mem.temp_size_in_bytes
    out.append(
      {
        'placement': name,
        'split': f'{config.parallel.attn_devices}:{config.parallel.moe_devices}'
        if config.parallel.strategy == 'ma_sep'
        else None,
        'shard_optimizer': layout.sharded,
        'role': role,
        'params': params,
        'optimizer': optimizer,
        'compute_copy_held': copy_held,
        'compute_copy_used': copy_used,
        'gradients': grads,
        'compiled_arguments': mem.argument_size_in_bytes,
        'compiled_temporaries': mem.temp_size_in_bytes,
        'total': total,
        'state_efficiency_min': min(effs),
        'planner_state': planner.state,
        'planner_temporaries': planner.grads + planner.activations,
        'fits_80gb': total <= GPU_MEMORY,
        'compile_s': round(seconds, 1),
        'collective_bytes': collectives,
      }
    )
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--gpu_topology', default=None, help="e.g. '1x1x16' (needs one GPU)")
  parser.add_argument('--smoke', action='store_true', help='the tiny config, two placements')
  parser.add_argument('--only', default='', help='comma-separated placement names to run')
  parser.add_argument('--out', default=None, help='JSON path (default under docs/benchmarks)')
  args = parser.parse_args()
  devices = _devices(args.gpu_topology)
  # cuDNN flash attention on the GPU compile (what a GPU run uses), the blockwise XLA path on CPU.
  attention = {'model.attention_impl': 'cudnn' if args.gpu_topology else 'xla'}
  module, base = (tiny, {}) if args.smoke else (paper, {**PAPER, **attention})
  names = list(SMOKE if args.smoke else PLACEMENTS)
  if args.only:
    names = [n for n in names if n in args.only.split(',')]
  suffix = '_smoke' if args.smoke else ('' if args.gpu_topology else '_cpu')
  out = args.out or f'docs/benchmarks/memory{suffix}.json'
  target = f'{args.gpu_topology} x {devices[0].device_kind}' if args.gpu_topology else '16 CPU'
  # Rows of other placements already in `out` (from another call, same target) are kept.
  rows, commands = [], []
  if os.path.exists(out):
    with open(out) as f:
      old = json.load(f)
    if old.get('target') == target:
      rows = [r for r in old['rows'] if r['placement'] not in names]
      commands = old.get('commands', [])
  commands.append(' '.join(['python bench/memory.py', *sys.argv[1:]]))
  for name in names:
    only_sharded = 'parallel.shard_gradients' in PLACEMENTS[name]
    for shard in (True,) if only_sharded else (False, True):
      overrides = {**base, **PLACEMENTS[name], 'parallel.shard_optimizer': shard}
      config = _config(module, overrides)
      if config.parallel.auto_fields:
        config, _ = train_lib.resolve_auto_placement(config, _cd(module, overrides), devices)
      rows += rows_of(config, devices, name)
      r = rows[-1]
      print(
        f'{name} shard_optimizer={shard}: {r["total"] / 1e9:.1f} GB per device, compiled in '
        f'{r["compile_s"]:.0f} s',
        flush=True,
      )
      _write(out, commands, target, rows)
  with open(out) as f:
    print(table(json.load(f)['rows'], target, out))


def _cd(module, overrides):
  cd = module.get_config()
  for dotted, value in overrides.items():
    section, field = dotted.split('.')
    cd[section][field] = value
  return cd


def _write(out, commands, target, rows):
  os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
  order = list(PLACEMENTS)
  rows = sorted(rows, key=lambda r: (order.index(r['placement']), r['shard_optimizer']))
  with open(out, 'w') as f:
    json.dump({'commands': commands, 'target': target, 'rows': rows}, f, indent=1)


def table(rows, target, out) -> str:
  gb = lambda x: f'{x / 1e9:.3g}'
  lines = [
    f'{target}; GB per device; {out}',
    '',
    '| placement | shard_optimizer | role | params | optimizer | compute copy (used) '
    '| gradients | temporaries (planner) | total | state efficiency | fits 80 GB |',
    '|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    name = r['placement'] + (f' ({r["split"]})' if r['placement'] == 'ma_sep best' else '')
    copy = f'{gb(r["compute_copy_held"])} ({gb(r["compute_copy_used"])})'
    lines.append(
      f'| {name} | {r["shard_optimizer"]} | {r["role"]} | {gb(r["params"])} | '
      f'{gb(r["optimizer"])} | {copy} | {gb(r["gradients"])} | '
      f'{gb(r["compiled_temporaries"])} ({gb(r["planner_temporaries"])}) | {gb(r["total"])} | '
      f'{r["state_efficiency_min"]:.1%} | {"yes" if r["fits_80gb"] else "no"} |'
    )
  return '\n'.join(lines)


if __name__ == '__main__':
  main()
