"""ma_sep's attention group, heads against batch (parallel.attn_sharding), at the seed's shapes.

With attn_sharding='heads' (the seed's) an attention device of a 12:4 split runs ceil(32 / 12) = 3
head slots of every sequence of a micro-batch; with 'batch' (data-parallel attention, as in
MegaScale-Infer) it runs all 32 heads of ceil(b / 12) of the b sequences. This script
  1. times, on one GPU, what one attention device runs per layer under each option, at the seed
     model's shapes (configs/paper.py: d_model 4096, 32 heads of 128, context 2048, bf16):
     - train: the attention block's forward and forward + backward (bench/gpu_bench.py's
       `attention_sweep`, cuDNN) on the micro-batch the planner runs for the seed's batch at
       12:4, and on a 3x larger one;
     - decode: one step of norm + cached attention + cache write (bench/decode.py's
       `time_attention`) at the seed's decode batch (24 sequences) and at 256;
  2. adds those timings to the device's calibration (docs/benchmarks/<device>_calibration.json and
     <device>_decode_calibration.json) and asks the planner (mas_jax.perf) for ma_sep 12:4 and for
     the best split under each option, for the seed's training step and its decode step, and
     which option it picks.
Writes docs/benchmarks/attn_sharding.{json,md}.

  python bench/attn_sharding.py                      # on a GPU: timings, then the planner
  python bench/attn_sharding.py --smoke --out /tmp/x  # tiny shapes on CPU (run by the tests)
  python bench/attn_sharding.py --planner_only=docs/benchmarks/attn_sharding.json
      # no GPU: the planner part again from a saved result's timings
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import decode as decode_bench  # noqa: E402
import gpu_bench  # noqa: E402
import jax  # noqa: E402

from configs import paper  # noqa: E402
from mas_jax import perf as pm  # noqa: E402
from mas_jax.config import from_config_dict  # noqa: E402
from mas_jax.perf import planner, reproduce  # noqa: E402
from mas_jax.perf.calibration import Calibration  # noqa: E402

OPTIONS = ('heads', 'batch')
SPLIT = (12, 4)  # the seed's
DECODE_BATCHES = (reproduce.SEED_DECODE_BATCH, 256)
DEVICE = 'NVIDIA H100 80GB HBM3'  # the planner's hardware when no GPU is attached


def seed_model() -> pm.ModelSpec:
  return pm.ModelSpec.from_config(from_config_dict(paper.get_config()))


def workloads(m: pm.ModelSpec) -> dict[str, pm.Workload]:
  out = {'train': pm.Workload('train', m.batch_size, m.seq_len)}
  for b in DECODE_BATCHES:
    out[f'decode {b}'] = pm.Workload('decode', b, m.seq_len)
  return out


def calibration(device: str, extra: list[dict]) -> tuple[pm.Hardware, Calibration | None, str]:
  """The planner's hardware for `device`, its train and decode calibrations merged, plus the
  attention timings `extra` (calibration schema) of this run."""
  hw, cal, name = planner.hardware_for_device(device)
  if cal is None:
    cal = Calibration(device)
  path = os.path.join(
    planner.CALIBRATION_DIR, f'{planner.device_slug(device)}_decode_calibration.json'
  )
  if os.path.isfile(path):
    decode_cal = Calibration.load(path)
    cal.attention += decode_cal.attention
    cal.expert_ffn += decode_cal.expert_ffn
    name += f' and {os.path.relpath(path)}'
  cal.attention += extra
  return hw, cal, name + (f' and {len(extra)} timings of this run' if extra else '')


def kernel_cases(m: pm.ModelSpec, hw, cal) -> list[dict]:
  """(mode, option, heads, batch) of one attention device at the seed split, for both options:
  the planner's micro-batch of the seed's train step (and 3x it), and the decode batches."""
  a = SPLIT[0]
  train = pm.best_ma_sep(m, hw, workloads(m)['train'], *SPLIT, cal)
  micro = m.batch_size // train.accumulation // train.microbatches
  cases = []
  for mode, b in [('train', micro), ('train', 3 * micro), *(('decode', d) for d in DECODE_BATCHES)]:
    cases.append({'mode': mode, 'option': 'heads', 'heads': math.ceil(m.num_heads / a), 'batch': b})
    cases.append({'mode': mode, 'option': 'batch', 'heads': m.num_heads, 'batch': math.ceil(b / a)})
  return cases


def time_cases(cases: list[dict], smoke: bool) -> list[dict]:
  """Per-layer seconds of each case on the attached device (smoke: tiny shapes)."""
  d, seq = (128, 16) if smoke else (4096, 2048)
  dec = decode_bench.SMOKE if smoke else decode_bench.GPU
  out = []
  if smoke:  # one case per mode and option, at most 2 sequences of 4 heads
    cases = [{**c, 'heads': min(c['heads'], 4), 'batch': min(c['batch'], 2)} for c in cases]
    cases = [c for i, c in enumerate(cases) if i in (0, 1, 4, 5)]
  for c in cases:
    heads = c['heads']
    if c['mode'] == 'train':
      s = {'d_model': d, 'seq': seq, 'attn_batch': c['batch'], 'heads': [heads]}
      s['attn_impls'] = ['xla'] if smoke else ['cudnn']
      row = gpu_bench.attention_sweep(s)[0]
      timing = {
        k: row[k] for k in ('fwd_s', 'fwd_bwd_s', 'fwd_tflops', 'fwd_bwd_tflops') if k in row
      }
    else:
      row = decode_bench.time_attention(dec, heads, c['batch'], 16 if smoke else seq)
      timing = {k: row[k] for k in ('time_s', 'gbps') if k in row}
    out.append({**c, **timing, **({'error': row['error']} if 'error' in row else {})})
    print(
      f'  {c["mode"]:<6} {c["option"]:<5} heads {c["heads"]:>2} batch {c["batch"]:>3}: {timing}'
    )
  return out


def calibration_entries(timed: list[dict], smoke: bool) -> list[dict]:
  """The timed cases as calibration entries (the planner's attention forward per layer)."""
  if smoke:  # tiny shapes are not the seed's: nothing for the planner
    return []
  entries = []
  for t in timed:
    time_s = t.get('fwd_s', t.get('time_s'))
    if time_s is not None:
      entries.append(
        {'mode': t['mode'], 'heads': t['heads'], 'batch': t['batch'], 'seq': 2048, 'time_s': time_s}
      )
  return entries


def _row(p: pm.Prediction, option: str) -> dict:
  attention = next(t for t in p.terms if t.name == 'attention')
  return {
    'option': option,
    'split': p.split,
    'microbatches': p.microbatches,
    'accumulation': p.accumulation,
    'step_s': p.step_s,
    'attention_s': attention.time_s,
    'attention_measured': attention.measured,
    'busy': p.busy,
    'fits': p.fits,
    'notes': p.notes,
  }


def planner_choices(m: pm.ModelSpec, hw, cal) -> dict:
  """Per workload: 12:4 and the best split under each option, and the option the planner picks
  (placements that fit first, then step time, like `planner.plan`)."""
  out = {}
  for name, w in workloads(m).items():
    seed, best = {}, {}
    for option in OPTIONS:
      seed[option] = pm.best_ma_sep(m, hw, w, *SPLIT, cal, attn_sharding=option)
      best[option] = planner.choose_ma_sep_split(m, hw, w, 16, cal, attn_sharding=option)[0]
    rank = lambda o, table: (not table[o].fits, table[o].step_s)  # noqa: E731
    out[name] = {
      'seed_split': [_row(seed[o], o) for o in OPTIONS],
      'best_split': [_row(best[o], o) for o in OPTIONS],
      'pick_at_seed_split': min(OPTIONS, key=lambda o: rank(o, seed)),
      'pick_overall': min(OPTIONS, key=lambda o: rank(o, best)),
    }
  return out


def markdown(r: dict) -> str:
  lines = [
    f'# Attention group: heads vs batch ({r["device"]})',
    '',
    f'Command: `{common.shell_command(r["command"])}`. Planner hardware: {r["hardware"]}.',
    '',
    '## One attention device, one layer (seed shapes, 12:4 split)',
    '',
    '| mode | attn_sharding | heads | sequences | forward (ms) | fwd+bwd (ms) | TFLOP/s fwd |',
    '|---|---|---|---|---|---|---|',
  ]
  ms = lambda x: '-' if x is None else f'{x * 1e3:.3f}'  # noqa: E731
  for t in r['kernels']:
    fwd = t.get('fwd_s', t.get('time_s'))
    tflops = f'{t["fwd_tflops"]:.0f}' if 'fwd_tflops' in t else '-'
    lines.append(
      f'| {t["mode"]} | {t["option"]} | {t["heads"]} | {t["batch"]} | {ms(fwd)} | '
      f'{ms(t.get("fwd_bwd_s"))} | {tflops} |'
    )
  lines += [
    '',
    '## The planner',
    '',
    '| workload | placement | attn_sharding | M | accum | step (ms) | attention term (ms) | '
    'busy attn / experts | fits |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  for name, c in r['planner'].items():
    for placement in ('seed_split', 'best_split'):
      for row in c[placement]:
        busy = f'{row["busy"]["attention"]:.0%} / {row["busy"]["experts"]:.0%}'
        lines.append(
          f'| {name} | {row["split"]} | {row["option"]} | {row["microbatches"]} | '
          f'{row["accumulation"]} | {row["step_s"] * 1e3:.4g} | {row["attention_s"] * 1e3:.4g}'
          f'{"" if row["attention_measured"] else " (roofline)"} | {busy} | '
          f'{"yes" if row["fits"] else "no"} |'
        )
  lines += ['', 'Picks (placements that fit first, then step time):', '']
  for name, c in r['planner'].items():
    lines.append(
      f'- {name}: `{c["pick_at_seed_split"]}` at 12:4, `{c["pick_overall"]}` over every split.'
    )
  return '\n'.join(lines) + '\n'


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--smoke', action='store_true', help='tiny shapes on CPU (test suite)')
  parser.add_argument('--out', default='docs/benchmarks')
  parser.add_argument('--planner_only', metavar='RESULT_JSON', help='reuse timings; no GPU')
  args = parser.parse_args()
  m = seed_model()
  if args.planner_only:
    with open(args.planner_only) as f:
      saved = json.load(f)
    device, timed = saved['device'], saved['kernels']
  else:
    device = DEVICE if args.smoke else jax.devices()[0].device_kind
    hw, cal, _ = calibration(device, [])
    timed = time_cases(kernel_cases(m, hw, cal), args.smoke)
  hw, cal, hardware = calibration(device, calibration_entries(timed, args.smoke))
  result = {
    'device': device,
    'command': common.command_line(__file__),
    'hardware': hardware,
    'kernels': timed,
    'planner': planner_choices(m, hw, cal),
  }
  stem = 'attn_sharding_smoke' if args.smoke else 'attn_sharding'
  common.write_result(args.out, stem, result, markdown(result))
  print(markdown(result))


if __name__ == '__main__':
  main()
