"""Loss effect of two train-step levers over a tiny-config run (CPU is fine, a few minutes).

Trains configs/tiny.py (embedded C4 sample, reference strategy, one device) for `--steps` steps
once per variant, from the same seed and data:
  float32     the default: both AdamW moments float32;
  bf16_mu     train.mu_dtype='bfloat16' (AdamW's first moment in bfloat16);
  loss_chunk  model.loss_chunk=256 (the output head + cross entropy in chunks of 256 tokens of
              the 1024 a step has; float32 moments): the same loss up to float rounding.
Writes <out>/optimizer_levers.json (every logged train and eval loss of each run, wall time, the
command) and <out>/optimizer_levers.md (the table docs/benchmarks/README.md quotes).

--memory instead compiles (allocating nothing) the train step of bench/gpu_bench.py's best row
(configs/paper.py at 1 layer, batch 64 as 4 x 16 sequences of 2048, XLA attention) with each
lever on the local device and writes the compiled step's argument and temporary bytes to
<out>/optimizer_levers_memory.{json,md}: on CPU that is XLA's CPU buffer assignment, not a GPU's.

  python bench/optimizer_levers.py                    # 300 steps, -> docs/benchmarks/
  python bench/optimizer_levers.py --smoke            # 4 steps, -> a temporary folder
  python bench/optimizer_levers.py --render=docs/benchmarks/optimizer_levers.json  # md only
  python bench/optimizer_levers.py --memory           # compiled memory at the best GPU row
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import optax  # noqa: E402

from configs import paper, tiny  # noqa: E402
from mas_jax import config as config_lib  # noqa: E402
from mas_jax import strategies, train_lib  # noqa: E402

VARIANTS = {
  'float32': {},
  'bf16_mu': {'train.mu_dtype': 'bfloat16'},
  'loss_chunk': {'model.loss_chunk': 256},
}


def compiled_memory(smoke: bool) -> dict:
  """Argument and temporary GB of the compiled train step of gpu_bench's best row (its first
  smoke row with --smoke) with each lever of gpu_bench.lever_rows."""
  import gpu_bench

  s = gpu_bench.SMOKE if smoke else gpu_bench.GPU
  rows = {}
  for overrides in s['lever_rows']:
    cd = paper.get_config()
    cd.data.source = 'synthetic'
    full = {**overrides, 'parallel.strategy': 'reference', 'model.attention_impl': 'xla'}
    for dotted, value in full.items():
      section, field = dotted.split('.')
      cd[section][field] = value
    config = config_lib.from_config_dict(cd)
    compiled = train_lib.compile_abstract_train_step(config, strategies.get(config))
    mem = compiled.memory_analysis()
    lever = {k: v for k, v in overrides.items() if k in ('train.mu_dtype', 'model.loss_chunk')}
    rows[str(lever or 'none')] = {
      'overrides': full,
      'argument_gb': mem.argument_size_in_bytes / 1e9,
      'temp_gb': mem.temp_size_in_bytes / 1e9,
    }
    print(lever, rows[str(lever or 'none')], flush=True)
  return rows


def memory_markdown(result: dict) -> str:
  out = [
    f'# Compiled train-step memory of the best GPU row with each lever ({result["device"]})',
    '',
    f'Command: `{common.shell_command(result["command"])}` (JAX {result["jax"]}; compile only)',
    '',
    '| levers | arguments GB | temporaries GB |',
    '|---|---|---|',
  ]
  for name, r in result['rows'].items():
    out.append(f'| `{name}` | {r["argument_gb"]:.2f} | {r["temp_gb"]:.2f} |')
  return '\n'.join(out) + '\n'


def train(overrides: dict, steps: int, workdir: str) -> dict:
  """One tiny run with dotted overrides; its logged losses and wall time."""
  cd = tiny.get_config()
  cd.train.steps = steps
  cd.train.tensorboard = False
  cd.train.log_every = min(10, steps)
  cd.train.eval_every = min(100, steps)
  for dotted, value in overrides.items():
    section, field = dotted.split('.')
    cd[section][field] = value
  start = time.perf_counter()
  train_lib.train_and_evaluate(cd, workdir)
  wall = time.perf_counter() - start
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  return {
    'overrides': overrides,
    'wall_s': wall,
    'train_loss': {r['step']: r['loss'] for r in lines},
    'eval_loss': {r['step']: r['eval_loss'] for r in lines if 'eval_loss' in r},
  }


def markdown(result: dict) -> str:
  runs = result['runs']
  base = runs['float32']
  steps = sorted(base['eval_loss'], key=int)
  last = max(base['train_loss'], key=int)
  out = [
    f'# Optimizer levers on configs/tiny.py, {result["steps"]} steps ({result["device"]})',
    '',
    f'Command: `{common.shell_command(result["command"])}` (JAX {result["jax"]}, optax '
    f'{result["optax"]})',
    '',
    '| run | overrides | '
    + ' | '.join(f'eval loss @{s}' for s in steps)
    + f' | train loss @{last} | mean / max abs train-loss difference to float32 | wall s |',
    '|---|---|' + '---|' * len(steps) + '---|---|---|',
  ]
  for name, r in runs.items():
    diffs = [abs(r['train_loss'][s] - base['train_loss'][s]) for s in base['train_loss']]
    out.append(
      f'| {name} | `{r["overrides"] or "-"}` | '
      + ' | '.join(f'{r["eval_loss"][s]:.4f}' for s in steps)
      + f' | {r["train_loss"][last]:.4f} | {sum(diffs) / len(diffs):.2g} / {max(diffs):.2g} | '
      f'{r["wall_s"]:.0f} |'
    )
  return '\n'.join(out) + '\n'


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--smoke', action='store_true', help='4 steps into a temporary folder')
  parser.add_argument('--out', default=None, help='default: docs/benchmarks (a temp dir: smoke)')
  parser.add_argument('--render', metavar='RESULT_JSON', help='rewrite the markdown of a result')
  parser.add_argument('--memory', action='store_true', help='compiled memory of the GPU rows')
  args = parser.parse_args()
  if args.render:
    common.render(args.render, markdown)
    return
  if args.memory:
    out = args.out or (tempfile.mkdtemp() if args.smoke else 'docs/benchmarks')
    result = {
      'command': common.command_line(__file__),
      'device': jax.devices()[0].device_kind,
      'jax': jax.__version__,
      'rows': compiled_memory(args.smoke),
    }
    common.write_result(out, 'optimizer_levers_memory', result, memory_markdown(result))
    print(memory_markdown(result))
    return
  steps = 4 if args.smoke else args.steps
  out = args.out or (tempfile.mkdtemp() if args.smoke else 'docs/benchmarks')
  result = {
    'command': common.command_line(__file__),
    'device': jax.devices()[0].device_kind,
    'jax': jax.__version__,
    'optax': optax.__version__,
    'steps': steps,
    'runs': {},
  }
  with tempfile.TemporaryDirectory() as tmp:
    for name, overrides in VARIANTS.items():
      result['runs'][name] = train(overrides, steps, os.path.join(tmp, name))
      print(name, result['runs'][name]['eval_loss'], flush=True)
  common.write_result(out, 'optimizer_levers', result, markdown(result))
  print(markdown(result))
  print(f'wrote {out}/optimizer_levers.{{json,md}}')


if __name__ == '__main__':
  main()
