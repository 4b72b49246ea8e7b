"""Shared by the benchmark scripts: time the mas-jax train step of a config on all devices."""

from __future__ import annotations

import json
import os
import re
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import paper
from mas_jax import config as config_lib
from mas_jax import metrics as metrics_lib
from mas_jax import strategies, train_lib, zero


def device_stem(smoke: bool) -> str:
  """File-name stem of a result: the device kind ('nvidia_h100_80gb_hbm3'), or 'cpu_smoke'."""
  if smoke:
    return 'cpu_smoke'
  return re.sub(r'[^a-z0-9]+', '_', jax.devices()[0].device_kind.lower()).strip('_')


def command_line(script: str) -> str:
  """The running command as one shell line, for a result to record: the environment variables
  that change what XLA does (XLA_*, JAX_PLATFORMS), then `python`, the script's path from the
  repository root (`script` is the caller's __file__) and the arguments, quoted."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = [
    f'{k}={shlex.quote(v)}'
    for k, v in sorted(os.environ.items())
    if k.startswith('XLA_') or k == 'JAX_PLATFORMS'
  ]
  path = os.path.relpath(os.path.abspath(script), root)
  return ' '.join([*env, 'python', path, *map(shlex.quote, sys.argv[1:])])


def shell_command(recorded: str) -> str:
  """A result's recorded command as a shell line. Results written before `command_line` record
  ' '.join(sys.argv), i.e. the script and its arguments without the `python` that ran them."""
  return f'python {recorded}' if recorded.split(' ', 1)[0].endswith('.py') else recorded


def render(result_json: str, markdown) -> None:
  """Rewrites the markdown next to a saved result from the result alone (markdown: its renderer)."""
  with open(result_json) as f:
    result = json.load(f)
  path = result_json.removesuffix('.json') + '.md'
  with open(path, 'w') as f:
    f.write(markdown(result))
  print(f'wrote {path}')


def write_result(out_dir: str, stem: str, result: dict, table: str) -> None:
  """Writes <stem>.json (the raw numbers) and <stem>.md (the table) under out_dir."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f'{stem}.json'), 'w') as f:
    json.dump(result, f, indent=1, default=float)
  with open(os.path.join(out_dir, f'{stem}.md'), 'w') as f:
    f.write(table)


def bench(fn, *args, repeats: int = 10, warmup: int = 2) -> float:
  """Median wall time (s) of fn(*args) after warm-up, synchronising on the outputs."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def build_train_step(overrides: dict):
  """configs/paper.py with dotted overrides and synthetic data: the trainer's own compiled train
  step (`train_lib.compile_train_step`: forward, backward, AdamW, donated state), a fresh state
  and one fixed batch. Returns (config, strategy, step, state, batch)."""
  cd = paper.get_config()
  cd.data.source = 'synthetic'
  for dotted, value in overrides.items():
    section, field = dotted.split('.')
    cd[section][field] = value
  config = config_lib.from_config_dict(cd)
  strategy = strategies.get(config)
  tx = train_lib.make_optimizer(config.train)
  layout = zero.ParamLayout(config, strategy)
  state, shardings = train_lib.create_train_state(layout, tx)
  step = train_lib.compile_train_step(config, layout, tx, shardings, state)
  shape = (config.data.batch_size, config.data.seq_len + 1)
  tokens_np = np.random.default_rng(0).integers(0, config.model.vocab_size, shape, np.int32)
  batch = jax.device_put(tokens_np, strategy.batch_sharding())
  return config, strategy, step, state, batch


def time_train_step(overrides: dict, repeats: int, warmup: int = 2) -> dict:
  """Median step time and figures of `build_train_step(overrides)`, on one fixed batch; MFU is
  against the datasheet peak of all devices used."""
  config, strategy, step, state, batch = build_train_step(overrides)
  for _ in range(warmup):
    state, m = step(state, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  t = statistics.median(times)
  tokens = config.data.batch_size * config.data.seq_len
  flops = metrics_lib.train_flops_per_token(config.model, config.data.seq_len) * tokens
  peak = metrics_lib.peak_flops(jax.devices()[0].device_kind)
  mem = step.memory_analysis()
  return {
    'overrides': overrides,
    'step_s': t,
    'tokens_per_s': tokens / t,
    'model_tflops': flops / t / 1e12,
    'mfu': flops / t / (peak * len(strategy.devices)) if peak else None,
    'params': metrics_lib.param_count(config.model)['total'],
    'loss': float(m['loss']),
    # Of the last timed step (on the repeated batch): with capacity routing on the grouped
    # kernels the dropped pairs are not computed, so the time depends on it.
    'dropped_token_fraction': float(m['dropped_token_fraction'])
    if 'dropped_token_fraction' in m
    else None,
    'memory_per_device_gb': None
    if mem is None
    else (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 1e9,
    'strategy': strategy,
  }


def time_chain(step, states: list, calls: int, repeats: int = 5, warmup: int = 1):
  """Median over `repeats` of the mean seconds per call of `calls` chained calls.

  Each call is `state = step(state)`, dispatched without waiting for the previous one (the way a
  decode loop runs), so the host's dispatch overlaps the device's work and small steps are timed
  by the device. Calls rotate over `states` (several input sets, so that repeated calls do not
  read their data from the L2 cache); a donated state is replaced by the step's output.
  Returns (seconds per call, the final states).
  """
  states = list(states)

  def run(n):
    for i in range(n):
      states[i % len(states)] = step(states[i % len(states)])
    jax.block_until_ready(states)

  run(max(warmup * len(states), 1))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run(calls)
    times.append((time.perf_counter() - start) / calls)
  return statistics.median(times), states


def hbm_copy_gbps(elems: int, calls: int = 20) -> float:
  """HBM bandwidth of a float32 elementwise copy (v * 2) of `elems` values, bytes read + written,
  timed as a chain of calls (`time_chain`): the ceiling a memory-bound kernel is held against."""
  x = jax.random.normal(jax.random.key(0), (elems,), jnp.float32)
  t, _ = time_chain(jax.jit(lambda v: v * -1.0), [x], calls, warmup=5)
  return 2 * elems * 4 / t / 1e9
