"""Text output of the planner: markdown tables of predictions, and predicted vs measured."""

from __future__ import annotations

import json
import os

from mas_jax import perf as pm
from mas_jax.perf import ep, plots, validate


def table(headers: list[str], rows: list[list]) -> str:
  """A markdown table (it reads in a terminal too)."""
  cells = [[str(c) for c in r] for r in [headers, *rows]]
  widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
  lines = [
    '| ' + ' | '.join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + ' |' for r in cells
  ]
  lines.insert(1, '|' + '|'.join('-' * (w + 2) for w in widths) + '|')
  return '\n'.join(lines)


_ROLE = {'attention': 'A', 'experts': 'F', 'all': 'all'}  # AFD's letters for the two roles


def _roles(d: dict[str, float], fmt: str) -> str:
  return ' / '.join(f'{_ROLE[k]} {v:{fmt}}' for k, v in d.items())


def prediction_row(rank: int, p: pm.Prediction) -> list:
  """One ranked-table row of a prediction."""
  mem = _roles({k: v / 1e9 for k, v in p.memory.items()}, '.1f')
  return [
    rank,
    p.strategy,
    p.split,
    p.microbatches,
    p.accumulation,
    f'{p.step_s * 1e3:.3f}',
    f'{p.tokens_per_s:,.0f}',
    f'{100 * p.mfu:.1f}',
    _roles(p.busy, '.0%'),
    mem,
    'yes' if p.fits else 'NO',
    p.bound,
    ', '.join(p.measured) or '-',
  ]


PRED_HEADERS = [
  '#',
  'strategy',
  'split',
  'M',
  'accum',
  'step ms',
  'tokens/s',
  'MFU %',
  'busy (compute)',
  'memory GB/device',
  'fits',
  'bound by',
  'measured',
]


# ----------------------------------------------------------------------------------------------
# Plots (Agg backend: files only).


def print_plan(m, hw, w, n, cal=None, measured=(), plot_dir=None, top=25) -> list[pm.Prediction]:
  """Prints the ranked table of every strategy on n devices; plots when plot_dir is given."""
  preds = pm.plan(m, hw, w, n, cal)
  acc = pm.accounting(m)
  print(
    f'# {w.mode} on {n} x {hw.name} ({hw.gpus_per_node} per node): batch {w.batch}, '
    f'context {w.context}'
  )
  print(
    f'model: {acc["params_total"] / 1e9:.2f} B params, {acc["params_active_matmul"] / 1e9:.2f}'
    f' B active matmul params, {acc["flops_train_per_token"] / 1e9:.2f} GFLOP/token training'
  )
  print('measured hardware figures: ' + (', '.join(measured) or 'none (datasheet peaks)'))
  if cal:
    print(
      f'calibration: {cal.device}; the "measured" column names terms taken from it, '
      'the rest are modelled'
    )
  print(table(PRED_HEADERS, [prediction_row(i + 1, p) for i, p in enumerate(preds[:top])]))
  best = preds[0]
  best_ma = next((p for p in preds if p.strategy == 'ma_sep'), None)
  ma = (
    f'best ma_sep split {best_ma.split} (M={best_ma.microbatches})'
    if best_ma
    else f'no ma_sep split on {n} device(s) (it needs 2 or more): no split sweep'
  )
  print(
    f'\nbest: {best.strategy} {best.split}; {ma}; '
    f'step = {"training step" if w.mode == "train" else "TPOT"}; '
    'busy = compute-kernel time / step.'
  )
  if plot_dir:
    os.makedirs(plot_dir, exist_ok=True)
    roof = os.path.join(plot_dir, 'afd_roofline.png')
    plots.plot_afd_roofline(roof)
    written = [roof]
    if best_ma:
      sweep = os.path.join(plot_dir, f'split_sweep_{w.mode}.png')
      title = f'{w.mode}: {n} x {hw.name}, batch {w.batch}, context {w.context}'
      plots.plot_split_sweep(preds, sweep, title)
      written.insert(0, sweep)
    print('wrote ' + ' and '.join(written))
  return preds


def compare_measured(config, hw, cal, bench_path: str) -> list:
  """Prints the one-device (dp1 = reference strategy) training step predicted with `cal` vs each
  measured train step of `bench_path`, in-sample and held-out rows apart
  (mas_jax/perf/validate.py; for a calibration from kernel rows alone use --validate)."""
  name = cal.device if cal else 'no calibration (datasheet peaks)'
  return validate.print_validation(
    config, hw, cal or pm.Calibration(), [bench_path], f'--calibration ({name})'
  )


def compare_decode(m: pm.ModelSpec, cal, context: int, bench_path: str) -> list[list]:
  """The one-GPU reference decode step (dp1) predicted with the calibration vs bench/decode.py's
  measured whole-model TPOT (the decode path's experts)."""
  with open(bench_path) as f:
    bench = json.load(f)
  hw = pm.HARDWARE['h100']
  if cal:
    hw, _ = cal.apply(hw, m.compute_dtype)
  rows = []
  for r in bench.get('model', {}).get('rows', []):
    if 'tpot_s' not in r or r.get('expert_impl', 'auto') != 'auto' or r['context'] != context:
      continue
    p = ep.predict(m, hw, pm.Workload('decode', r['batch'], r['context']), 1, 1, cal)
    rows.append(
      [
        r['batch'],
        f'{p.step_s * 1e3:.3f}',
        f'{r["tpot_s"] * 1e3:.3f}',
        f'{(p.step_s - r["tpot_s"]) / r["tpot_s"]:+.1%}',
        ', '.join(f'{t.name} {t.time_s * 1e3:.3f}' for t in p.terms if t.time_s > 0),
        ', '.join(p.measured) or '-',
      ]
    )
  print(
    f'\n## One-GPU reference decode step: predicted ({hw.name}'
    f'{", calibrated" if cal else ""}) vs measured ({bench.get("device")})'
  )
  headers = ['batch', 'predicted ms', 'measured ms', 'error', 'terms ms', 'measured terms']
  print(table(headers, rows))
  return rows
