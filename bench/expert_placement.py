"""Dynamic expert re-placement under a skewed router: routed load per expert device, and the
planner's step time for the seed model from the measured load fractions.

On 16 fake CPU devices, the tiny model as ma_sep 12:4 (2 micro-batches, synthetic data) starts
with its router skewed towards expert device 0: the router columns of experts 0-3 (device 0's
slots at the start) are scaled by `--skew`, so those experts win the top-2 more often. It trains
`--steps` steps with `parallel.rebalance_every=--every`, through the loop's own re-placement
(`mas_jax.rebalance.Rebalancer`), and records per window:
  - the busiest expert device's share of the routed token-expert pairs, under the table the
    window ran with (the first window: experts in their initial slots);
  - the share the new table would have given the same window (what LPT chose it for);
  - the dropped-token fraction.
Then the planner (mas_jax.perf, H100 calibration) predicts the seed model's ma_sep 12:4 train
step and decode step with the first window's load fractions, experts in their initial slots
against the table LPT chooses for them, for a kernel that computes the routed rows (dropless;
ma_sep's capacity einsum computes fixed buffers, so its time does not follow the load).
Writes docs/benchmarks/expert_placement.{json,md}.

  python bench/expert_placement.py                        # CPU, a few minutes
  python bench/expert_placement.py --smoke --out /tmp/x   # 4 steps (run by the tests)
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=16'
).strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import paper, tiny  # noqa: E402
from mas_jax import config as config_lib  # noqa: E402
from mas_jax import perf as pm  # noqa: E402
from mas_jax import rebalance, strategies, train_lib, zero  # noqa: E402
from mas_jax.perf import ma_sep as ma_sep_model  # noqa: E402
from mas_jax.perf import planner, reproduce  # noqa: E402


def tiny_config(every: int):
  cd = tiny.get_config()
  cd.data.source = 'synthetic'
  cd.data.seq_len = 32
  cd.parallel.strategy = 'ma_sep'
  cd.parallel.num_microbatches = 2
  cd.parallel.rebalance_every = every
  return config_lib.from_config_dict(cd)


def train_windows(steps: int, every: int, skew: float) -> list[dict]:
  """Per re-placement window: busiest device share under the running and the new table."""
  config = tiny_config(every)
  strategy = strategies.get(config)
  tx = train_lib.make_optimizer(config.train)
  layout = zero.ParamLayout(config, strategy)
  state, shardings = train_lib.create_train_state(layout, tx)
  router = state['params']['blocks']['moe']['router']  # [L, D, E], replicated
  hot = strategy.layout.local_experts  # experts 0 .. hot-1 start on expert device 0
  scale = np.ones(router.shape[-1], np.float32)
  scale[:hot] = skew
  state['params']['blocks']['moe']['router'] = jax.device_put(
    router * scale[None, None, :], router.sharding
  )
  step = train_lib.compile_train_step(config, layout, tx, shardings, state)
  rebalancer = rebalance.Rebalancer(layout, shardings)
  rng = np.random.default_rng(0)
  shape = (config.data.batch_size, config.data.seq_len + 1)
  windows, dropped = [], []
  for i in range(1, steps + 1):
    batch = rng.integers(0, config.model.vocab_size, shape, np.int32)
    state, metrics = step(state, jax.device_put(batch, strategy.batch_sharding()))
    dropped.append(float(metrics['dropped_token_fraction']))
    loads = np.asarray(jax.device_get(state['expert_load']))
    table = np.asarray(jax.device_get(state['placement']))
    state, placed = rebalancer.maybe_rebalance(i, state)
    if placed:
      windows.append(
        {
          'steps': [i - every + 1, i],
          'table': table.tolist(),
          'loads': (loads / loads.sum()).tolist(),
          'busiest_share': placed['busiest_expert_device_load_before'],
          'busiest_share_new_table': placed['busiest_expert_device_load_after'],
          'dropped_token_fraction': float(np.mean(dropped[-every:])),
        }
      )
      print(f'  steps {i - every + 1}-{i}: busiest expert device {placed}', flush=True)
  return windows


def planner_gain(loads: list[float]) -> list[dict]:
  """The seed model at 12:4: train and decode steps with `loads`, initial slots against LPT."""
  m = pm.ModelSpec.from_config(config_lib.from_config_dict(paper.get_config()))
  hw, cal, _ = planner.hardware_for_device('NVIDIA H100 80GB HBM3')
  rows = []
  for w in (
    pm.Workload('train', m.batch_size, m.seq_len, 32),
    pm.Workload('decode', reproduce.SEED_DECODE_BATCH, m.seq_len),
  ):
    split = ma_sep_model.Split(12, 4, 2 if w.train else 1)
    before, after = rebalance.predicted_steps(m, hw, w, split, loads, cal)
    rows.append({'workload': w.mode, 'step_s_initial': before, 'step_s_lpt': after})
  return rows


def markdown(r: dict) -> str:
  lines = [
    '# Expert re-placement under a skewed router',
    '',
    f'Command: `{common.shell_command(r["command"])}`. Tiny model, ma_sep 12:4, M = 2, router '
    f'columns of expert device 0 scaled by {r["skew"]}, re-placement every {r["every"]} steps.',
    '',
    '| steps | busiest expert device (share of routed pairs) | under the table chosen from '
    'these steps | dropped tokens |',
    '|---|---|---|---|',
  ]
  for w in r['windows']:
    lines.append(
      f'| {w["steps"][0]}-{w["steps"][1]} | {w["busiest_share"]:.1%} | '
      f'{w["busiest_share_new_table"]:.1%} | {w["dropped_token_fraction"]:.1%} |'
    )
  lines += [
    '',
    "The planner, seed model at 12:4 with the first window's load fractions (dropless kernel, "
    'H100 calibration):',
    '',
    '| workload | experts in their initial slots | LPT table | gain |',
    '|---|---|---|---|',
  ]
  for p in r['planner']:
    gain = 1 - p['step_s_lpt'] / p['step_s_initial']
    lines.append(
      f'| {p["workload"]} | {p["step_s_initial"] * 1e3:.4g} ms | {p["step_s_lpt"] * 1e3:.4g} ms '
      f'| {gain:.1%} |'
    )
  return '\n'.join(lines) + '\n'


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--smoke', action='store_true', help='4 steps (test suite)')
  parser.add_argument('--out', default='docs/benchmarks')
  parser.add_argument('--steps', type=int, default=40)
  parser.add_argument('--every', type=int, default=10)
  parser.add_argument('--skew', type=float, default=3.0)
  args = parser.parse_args()
  steps, every = (4, 2) if args.smoke else (args.steps, args.every)
  windows = train_windows(steps, every, args.skew)
  result = {
    'command': common.command_line(__file__),
    'skew': args.skew,
    'every': every,
    'windows': windows,
    'planner': planner_gain(windows[0]['loads']),
  }
  stem = 'expert_placement_smoke' if args.smoke else 'expert_placement'
  common.write_result(args.out, stem, result, markdown(result))
  print(markdown(result))


if __name__ == '__main__':
  main()
