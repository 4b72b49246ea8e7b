"""The planner's command line (`python -m mas_jax.perf`): the split planner and the paper
reproductions.

Rank every strategy and attention:expert split of a config, and write plots:
  python -m mas_jax.perf --config=configs/paper.py --hardware=a100_80g --mode=train --devices=16
  python -m mas_jax.perf --config=configs/paper.py --mode=decode --batch=24 \
    --calibration=docs/benchmarks/calibration.json
Compare the one-device training step with a GPU benchmark's measured train steps:
  python -m mas_jax.perf --config=configs/paper.py --hardware=h100 \
    --calibration=docs/benchmarks/nvidia_h100_80gb_hbm3_calibration.json \
    --measured=docs/benchmarks/nvidia_h100_80gb_hbm3.json
Held-out validation (calibration from the bench's kernel rows only; train steps predicted and
marked in sample or held out; mas_jax/perf/validate.py):
  python -m mas_jax.perf --config=configs/paper.py --hardware=h100 \
    --validate=docs/benchmarks/nvidia_h100_80gb_hbm3.json,docs/benchmarks/nvidia_h100_80gb_hbm3_heldout.json
Reproduce the AFD paper's roofline and penalties, or check the seed paper's claims:
  python -m mas_jax.perf --reproduce=afd
  python -m mas_jax.perf --reproduce=seed
The seed's decode table on 16 A100s (roofline) and 16 H100s (with a decode calibration of
bench/decode.py), and the one-GPU decode step predicted vs measured:
  python -m mas_jax.perf --reproduce=decode \
    --calibration=docs/benchmarks/nvidia_h100_80gb_hbm3_decode_calibration.json \
    --measured=docs/benchmarks/nvidia_h100_80gb_hbm3_decode.json
Plots go to --plot_dir (default ./perf_plots; the path is printed). The committed plots in
docs/plots are regenerated with --plot_dir=docs/plots (docs/performance_model.md lists the
commands).
"""

from __future__ import annotations

import dataclasses
import types

from absl import app, flags
from ml_collections import config_flags

from mas_jax import perf as pm
from mas_jax.perf import model as perf_model
from mas_jax.perf import report, reproduce, validate


def define_flags() -> types.SimpleNamespace:
  """Defines the CLI's flags (called by `run`, never on import)."""
  return types.SimpleNamespace(
    config=config_flags.DEFINE_config_file('config', 'configs/paper.py', 'Model config file.'),
    hardware=flags.DEFINE_string(
      'hardware', 'a100_80g', f'One of {sorted(pm.HARDWARE)} or a JSON file of figures.'
    ),
    hw=flags.DEFINE_multi_string(
      'hw', [], 'Hardware field override, e.g. --hw=gpus_per_node=4 --hw=scale_out_bw=6.25e9.'
    ),
    mode=flags.DEFINE_enum('mode', 'train', ['train', 'decode'], 'Workload to predict.'),
    devices=flags.DEFINE_integer('devices', 0, 'Devices; 0: attn_devices + moe_devices.'),
    batch=flags.DEFINE_integer(
      'batch', 0, 'Sequences (train batch / decode concurrency); 0: config.'
    ),
    context=flags.DEFINE_integer('context', 0, 'Decode context length; 0: config seq_len.'),
    calibration=flags.DEFINE_string('calibration', None, 'Calibration JSON of measured timings.'),
    plot_dir=flags.DEFINE_string(
      'plot_dir', 'perf_plots', 'Where PNG plots are written (created; the path is printed).'
    ),
    top=flags.DEFINE_integer('top', 25, 'Rows of the ranked table.'),
    expert_loads=flags.DEFINE_string(
      'expert_loads',
      None,
      "A run's metrics.jsonl: its measured expert load fractions (mean of the last 10 logged "
      'steps) set the busiest expert device of dropless routing and decode.',
    ),
    rebalanced=flags.DEFINE_bool(
      'rebalanced',
      False,
      'With --expert_loads: the experts placed as parallel.rebalance_every would place them for '
      'those loads (greedy LPT per expert-device count), instead of contiguously.',
    ),
    measured=flags.DEFINE_string(
      'measured', None, 'Bench JSON (bench/gpu_bench.py): predicted vs measured train steps.'
    ),
    validate=flags.DEFINE_list(
      'validate',
      None,
      'Bench JSONs (bench/gpu_bench.py): the held-out validation. The calibration is built '
      'from the kernel rows of the first file that has them (not --calibration); every '
      'train_step row is predicted and marked in sample or held out.',
    ),
    reproduce=flags.DEFINE_enum(
      'reproduce',
      None,
      ['afd', 'seed', 'decode'],
      "Print a paper reproduction ('decode': the seed's decode table on A100 and H100).",
    ),
  )


def hardware(f: types.SimpleNamespace, dtype: str):
  """Hardware from flags, with calibration applied; returns (hw, calibration, measured names)."""
  overrides = {}
  for item in f.hw.value:
    key, value = item.split('=', 1)
    overrides[key] = int(value) if key == 'gpus_per_node' else float(value)
  hw = pm.load_hardware(f.hardware.value, overrides)
  if not f.calibration.value:
    return hw, None, []
  cal = pm.Calibration.load(f.calibration.value)
  hw, measured = cal.apply(hw, dtype)
  return hw, cal, measured


def run_planner(f: types.SimpleNamespace) -> None:
  """Prints the ranked strategies and splits of the config, and writes the plots."""
  config = f.config.value
  m = pm.ModelSpec.from_config(config)
  if f.expert_loads.value:
    m = dataclasses.replace(
      m,
      expert_loads=perf_model.loads_from_metrics(f.expert_loads.value),
      rebalanced=f.rebalanced.value,
    )
    print(
      f'expert loads from {f.expert_loads.value}: ' + ', '.join(f'{x:.3f}' for x in m.expert_loads)
    )
  hw, cal, measured = hardware(f, m.compute_dtype)
  n = f.devices.value or config.parallel.attn_devices + config.parallel.moe_devices
  mode = f.mode.value
  batch = f.batch.value or m.batch_size
  context = m.seq_len if mode == 'train' else (f.context.value or m.seq_len)
  accumulation = config.train.get('grad_accum_steps', 1) if mode == 'train' else 1
  w = pm.Workload(
    mode, batch, context, accumulation, fuse_grad_accum=config.train.get('fuse_grad_accum', False)
  )
  report.print_plan(m, hw, w, n, cal, measured, f.plot_dir.value, f.top.value)


def main(f: types.SimpleNamespace, argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if f.rebalanced.value and not f.expert_loads.value:
    raise app.UsageError('--rebalanced places the experts by measured loads: give --expert_loads')
  config = f.config.value
  cal = pm.Calibration.load(f.calibration.value) if f.calibration.value else None
  if f.reproduce.value == 'afd':
    reproduce.reproduce_afd(f.plot_dir.value)
  elif f.reproduce.value == 'decode':
    m = pm.ModelSpec.from_config(config)
    reproduce.reproduce_decode(m, cal, f.context.value or m.seq_len, f.measured.value)
  elif f.reproduce.value == 'seed':
    reproduce.reproduce_seed(pm.ModelSpec.from_config(config), cal)
  elif f.validate.value:
    validate.validate(config, f.hardware.value, f.validate.value)
  elif f.measured.value:
    hw, cal, _ = hardware(f, config.model.compute_dtype)
    report.compare_measured(config, hw, cal, f.measured.value)
  else:
    run_planner(f)


def run() -> None:
  """Defines the flags and runs the CLI (python -m mas_jax.perf)."""
  f = define_flags()
  app.run(lambda argv: main(f, argv))
