"""Held-out validation of the one-GPU training-step prediction.

The calibration is built only from the per-kernel rows of a benchmark JSON (bench/gpu_bench.py):
the matmul and HBM ceilings, the cuDNN attention block's forward per head count, and the expert
FFN's forward per local-expert count (the capacity einsum, and the Mosaic-GPU grouped kernel that
`model.expert_impl='auto'` runs for dropless routing on Hopper). The whole train steps of the
`train_step` rows (one device: dp1 = the reference strategy) are then predicted with `ep.predict`
plus the elementwise and cast terms of mas_jax/perf/kernels.py, and each row is marked:

  in sample   at least one calibrated kernel the prediction used was timed at the row's own
              per-chunk shape (an exact calibration entry): the kernel time is a measurement of
              that row's kernel, not a prediction of it;
  held out    every calibrated kernel was extrapolated (a line through two entries, or one entry
              scaled in proportion) or modelled (roofline): the row's shapes were never timed.

A JSON may also say `"model_fixed_at": "<commit>"`: its rows were measured after the model and
its terms were committed there, so no term was written after seeing them ("new" below); rows of
files without it (docs/benchmarks/nvidia_h100_80gb_hbm3.json) were visible while the terms were
written, whatever their group. Errors are (predicted - measured) / measured, printed to two
decimals and never rounded into a claim. Rows with model.remat='save_dots' are shown but not
scored: the model has no save_dots recomputation (it saves some dots and recomputes the rest).

  python -m mas_jax.perf --config=configs/paper.py --hardware=h100 \\
    --validate=docs/benchmarks/nvidia_h100_80gb_hbm3.json,docs/benchmarks/nvidia_h100_80gb_hbm3_heldout.json
"""

from __future__ import annotations

import dataclasses
import json
import os

import ml_collections

from mas_jax import perf as pm
from mas_jax.perf import ep
from mas_jax.perf.calibration import Calibration

# The shapes bench/gpu_bench.py times its kernels at (its GPU dict): entries carry them as guard
# keys, so a model of other widths falls back to the roofline instead of borrowing these timings.
BENCH_SHAPES = {'d_model': 4096, 'head_dim': 128, 'expert_hidden': 16384}
TARGET = 0.10


def calibration_from_bench(bench: dict) -> Calibration:
  """A calibration from a bench JSON's kernel rows alone (never its train steps)."""
  attention = [
    {
      'mode': 'train',
      'heads': r['heads'],
      'batch': r['batch'],
      'seq': r['seq'],
      'time_s': r['fwd_s'],
      'd_model': BENCH_SHAPES['d_model'],
      'head_dim': BENCH_SHAPES['head_dim'],
    }
    for r in bench.get('attention', [])
    if r.get('impl') == 'cudnn' and 'fwd_s' in r
  ]
  experts = []
  for r in bench.get('expert_ffn', []):
    # What model.expert_impl='auto' runs: the einsum with capacity, Mosaic-GPU dropless.
    for dropless, impl in ((False, 'einsum'), (True, 'mosaic_gpu')):
      if f'{impl}_fwd_s' in r:
        experts.append(
          {
            'local_experts': r['local_experts'],
            'tokens': r['rows'],
            'dropless': dropless,
            'time_s': r[f'{impl}_fwd_s'],
            'd_model': BENCH_SHAPES['d_model'],
            'expert_hidden': BENCH_SHAPES['expert_hidden'],
          }
        )
  c = bench.get('ceilings', {})
  figures = {}
  # Rates timed as a chain of calls (bench/heldout.py) where the bench has them: inside a train
  # step kernels run back to back, with no host synchronisation after each as in the per-call
  # timing of gpu_bench.py's ceilings (which adds the host's round trip to a 0.9 ms copy).
  for key, names in (
    ('matmul_tflops', ('matmul_chain_tflops', 'matmul_bf16_tflops')),
    ('hbm_gbps', ('hbm_chain_gbps', 'hbm_copy_gbps')),
  ):
    found = [c[n] for n in names if c.get(n) is not None]
    if found:
      figures[key] = float(found[0])
  return Calibration(bench.get('device', ''), figures, attention, experts)


def config_of(config, overrides: dict):
  """The config with a bench row's dotted overrides applied (a copy)."""
  cd = ml_collections.ConfigDict(config.to_dict())
  for dotted, value in overrides.items():
    section, field = dotted.split('.')
    cd[section][field] = value
  return cd


@dataclasses.dataclass
class Row:
  """One predicted train step."""

  source: str
  overrides: dict
  batch: int
  accumulation: int
  layers: int
  experts: int
  top_k: int
  seq: int
  routing: str
  remat: str
  kernels_s: float  # ep.predict alone
  predicted_s: float  # with the elementwise and cast terms
  measured_s: float
  group: str  # 'in sample' or 'held out'
  new: bool  # measured after the model was fixed
  lookups: list
  terms: list

  @property
  def scored(self) -> bool:
    return self.remat != 'save_dots'

  def error(self, with_elementwise: bool = True) -> float:
    t = self.predicted_s if with_elementwise else self.kernels_s
    return (t - self.measured_s) / self.measured_s


def predict_rows(config, hw, cal: Calibration, bench_paths: list[str]) -> list[Row]:
  """Predicts every train_step row of the bench JSONs with `cal` (hw: calibration applied)."""
  rows = []
  for path in bench_paths:
    with open(path) as f:
      bench = json.load(f)
    new = bool(bench.get('model_fixed_at'))
    for entry in bench.get('train_step', []):
      if 'step_s' not in entry:
        continue
      cd = config_of(config, entry['overrides'])
      m = pm.ModelSpec.from_config(cd)
      accumulation = cd.train.get('grad_accum_steps', 1)
      w = pm.Workload(
        'train',
        m.batch_size,
        m.seq_len,
        accumulation,
        fit_memory=False,
        fuse_grad_accum=cd.train.get('fuse_grad_accum', False),
      )
      cal.lookups.clear()
      p = ep.predict(m, hw, w, 1, 1, cal)
      lookups = list(cal.lookups)
      dropout = m.expert_dropout
      routing = 'dropless' if m.dropless else 'capacity'
      if m.grouped_experts:
        routing += ', grouped'
      if dropout > 0:
        routing += f', dropout {dropout:g}'
      rows.append(
        Row(
          source=os.path.basename(path),
          overrides=entry['overrides'],
          batch=m.batch_size,
          accumulation=p.accumulation,
          layers=m.num_layers,
          experts=m.num_experts,
          top_k=m.top_k,
          seq=m.seq_len,
          routing=routing,
          remat=m.remat,
          kernels_s=p.step_s - p.time('elementwise', 'weight_casts'),
          predicted_s=p.step_s,
          measured_s=entry['step_s'],
          group='in sample' if any(how == 'exact' for _, _, how in lookups) else 'held out',
          new=new,
          lookups=lookups,
          terms=[t for t in p.terms if t.time_s > 0],
        )
      )
  return rows


def _pct(x: float) -> str:
  return f'{x:+.2%}'


def _lookup_text(lookups) -> str:
  if not lookups:
    return 'none (roofline)'
  names = {'attention': 'attn', 'expert_ffn': 'experts'}
  return ', '.join(f'{names[k]} {how}' for k, _, how in lookups)


def print_rows(rows: list[Row], title: str) -> None:
  from mas_jax.perf.report import table  # report imports this module

  headers = [
    'batch',
    'accum',
    'L',
    'E',
    'k',
    'seq',
    'experts',
    'remat',
    'calibrated kernels',
    'kernels-only ms',
    'predicted ms',
    'measured ms',
    'error kernels-only',
    'error',
  ]
  body = [
    [
      r.batch,
      r.accumulation,
      r.layers,
      r.experts,
      r.top_k,
      r.seq,
      r.routing,
      r.remat,
      _lookup_text(r.lookups),
      f'{r.kernels_s * 1e3:.1f}',
      f'{r.predicted_s * 1e3:.1f}',
      f'{r.measured_s * 1e3:.1f}',
      _pct(r.error(False)) if r.scored else 'not scored',
      _pct(r.error()) if r.scored else 'not scored (no save_dots model)',
    ]
    for r in rows
  ]
  print(f'\n### {title}\n')
  print(table(headers, body) if body else '(no rows)')


def summary(rows: list[Row]) -> list[list]:
  """Per group: rows scored, mean |error|, worst error and rows within the target, both with the
  elementwise terms and without (kernels only)."""
  groups = [
    ('in sample', lambda r: r.group == 'in sample'),
    ('held out, seen while the terms were written', lambda r: r.group == 'held out' and not r.new),
    ('held out, measured after the model was fixed', lambda r: r.group == 'held out' and r.new),
  ]
  out = []
  for name, keep in groups:
    scored = [r for r in rows if keep(r) and r.scored]
    if not scored:
      out.append([name, 0, '-', '-', '-', '-', '-', '-'])
      continue
    cells = [name, len(scored)]
    for with_elem in (True, False):
      errs = [r.error(with_elem) for r in scored]
      worst = max(errs, key=abs)
      inside = sum(abs(e) <= TARGET for e in errs)
      cells += [
        f'{sum(abs(e) for e in errs) / len(errs):.2%}',
        _pct(worst),
        f'{inside}/{len(errs)}',
      ]
    out.append(cells)
  return out


def print_validation(
  config, hw, cal: Calibration, bench_paths: list[str], source: str
) -> list[Row]:
  """Prints the held-out and in-sample tables and their summary; returns the rows."""
  from mas_jax.perf.report import table

  rows = predict_rows(config, hw, cal, bench_paths)
  print(
    f'# One-device training step: predicted ({hw.name}, calibration: {source}) vs measured\n'
    f'matmul {hw.bf16_flops / 1e12:.0f} TFLOP/s, HBM {hw.hbm_bw / 1e9:.0f} GB/s; '
    f'error = (predicted - measured) / measured; target |error| <= {TARGET:.0%}'
  )
  for name in ('in sample', 'held out'):
    for new in (False, True):
      part = [r for r in rows if r.group == name and r.new == new]
      if part:
        files = ', '.join(sorted({r.source for r in part}))
        print_rows(part, f'{name}: {files}')
  print('\n### Summary\n')
  headers = [
    'group',
    'rows',
    'mean |error|',
    'worst error',
    f'within {TARGET:.0%}',
    'kernels-only mean |error|',
    'kernels-only worst',
    f'kernels-only within {TARGET:.0%}',
  ]
  print(table(headers, summary(rows)))
  print(
    '\npredicted = ep.predict on one device; kernels-only = the same without its elementwise and '
    'weight_casts terms (mas_jax/perf/kernels.py). '
    'calibrated kernels: how each calibrated lookup was made (exact: timed at this shape).'
  )
  return rows


def validate(config, hardware: str, bench_paths: list[str]) -> list[Row]:
  """The held-out validation: calibration from the kernel rows of the first JSON that has them."""
  cal, source = None, ''
  for path in bench_paths:
    with open(path) as f:
      bench = json.load(f)
    if bench.get('attention') or bench.get('expert_ffn'):
      cal, source = calibration_from_bench(bench), f'kernel rows of {os.path.basename(path)}'
      break
  if cal is None:
    raise ValueError(f'none of {bench_paths} has kernel rows (attention, expert_ffn)')
  hw = pm.load_hardware(hardware, {})
  hw, _ = cal.apply(hw, config.model.compute_dtype)
  return print_validation(config, hw, cal, bench_paths, source)
