"""The planner: every valid strategy and split of a device count, ranked by predicted step time.

Only placements the strategies accept are considered (their ConfigErrors are mirrored by each
cost model's `invalid`), so the best split is one `train.py` can run.
"""

from __future__ import annotations

import os
import re
from typing import Any

from mas_jax.perf import ep as ep_model
from mas_jax.perf import ma_sep as ma_sep_model
from mas_jax.perf import tp_pp as tp_pp_model
from mas_jax.perf.calibration import Calibration
from mas_jax.perf.hardware import HARDWARE, Hardware, load_hardware
from mas_jax.perf.model import ModelSpec
from mas_jax.perf.prediction import Prediction, Workload

MICROBATCH_CHOICES = (1, 2, 4, 8)


def _rank(p: Prediction) -> tuple:
  return (not p.fits, p.step_s)


def _divisors(n: int) -> list[int]:
  return [i for i in range(1, n + 1) if n % i == 0]


def _chunk(w: Workload) -> int:
  return w.batch // max(1, w.accumulation)


def ma_sep_splits(m: ModelSpec, w: Workload, n: int, microbatches: int = 1) -> list[int]:
  """Attention-device counts of the ma_sep splits of n devices the strategy accepts."""
  tokens = m.seq_len  # the strategy checks the config's batch x seq_len, decode too
  return [
    a
    for a in range(1, n)
    if ma_sep_model.invalid(m, ma_sep_model.Split(a, n - a, microbatches), _chunk(w), tokens)
    is None
  ]


def best_ma_sep(
  m: ModelSpec,
  hw: Hardware,
  w: Workload,
  n_attn: int,
  n_moe: int,
  cal: Calibration | None = None,
  choices=MICROBATCH_CHOICES,
  **split_options,
) -> Prediction | None:
  """The fastest ma_sep prediction of a split over micro-batch counts it accepts (None: none)."""
  tokens = m.seq_len  # the strategy checks the config's batch x seq_len, decode too
  preds = []
  for c in choices:
    s = ma_sep_model.Split(n_attn, n_moe, c, **split_options)
    if ma_sep_model.invalid(m, s, _chunk(w), tokens) is None:
      preds.append(ma_sep_model.predict(m, hw, w, s, cal))
  return min(preds, key=_rank) if preds else None


def plan(
  m: ModelSpec, hw: Hardware, w: Workload, n_devices: int, cal: Calibration | None = None
) -> list[Prediction]:
  """Every valid strategy and split on n_devices, best first (placements that fit first)."""
  preds = [best_ma_sep(m, hw, w, a, n_devices - a, cal) for a in range(1, n_devices)]
  for tp in _divisors(n_devices):
    pp = n_devices // tp
    cands = [
      tp_pp_model.predict(m, hw, w, tp, pp, c, cal)
      for c in MICROBATCH_CHOICES
      if tp_pp_model.invalid(m, tp, pp, c, _chunk(w)) is None
    ]
    preds.append(min(cands, key=_rank) if cands else None)
  for ep in _divisors(n_devices):
    if ep_model.invalid(m, n_devices, ep, w.batch) is None:
      preds.append(ep_model.predict(m, hw, w, n_devices, ep, cal))
  return sorted((p for p in preds if p is not None), key=_rank)


def predict_config(
  config: Any,
  hw: Hardware,
  n_devices: int,
  cal: Calibration | None = None,
  workload: Workload | None = None,
) -> Prediction:
  """The prediction of the placement a config asks for on n_devices (its strategy, split and
  micro-batches), by default for a train step of its batch at exactly train.grad_accum_steps
  (the program as configured, whether or not the planner thinks it fits)."""
  m = ModelSpec.from_config(config)
  p = config.parallel
  w = workload or Workload(
    'train',
    m.batch_size,
    m.seq_len,
    config.train.grad_accum_steps,
    fit_memory=False,
    shard_optimizer=p.shard_optimizer,
    shard_gradients=p.shard_gradients,
    fuse_grad_accum=config.train.fuse_grad_accum,
  )
  if p.strategy == 'ma_sep':
    s = ma_sep_model.Split(
      p.attn_devices,
      p.moe_devices,
      p.num_microbatches,
      p.moe_dispatch,
      p.hierarchical_allreduce,
      p.attn_sharding,
    )
    return ma_sep_model.predict(m, hw, w, s, cal)
  if p.strategy == 'tp_pp':
    return tp_pp_model.predict(m, hw, w, p.tp, p.pp, p.num_microbatches, cal, p.pp_schedule)
  if p.strategy == 'ep':
    return ep_model.predict(m, hw, w, n_devices, p.ep, cal)
  if p.strategy == 'dp':
    return ep_model.predict(m, hw, w, n_devices, 1, cal)
  return ep_model.predict(m, hw, w, 1, 1, cal)  # reference: one device


# ---------------------------------------------------------------------------------------------
# parallel.attn_devices / moe_devices / num_microbatches = 'auto' (train.py resolves them here).
# ---------------------------------------------------------------------------------------------

# Where GPU benchmarks write calibrations: <repo>/docs/benchmarks/<device>_calibration.json.
CALIBRATION_DIR = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'docs', 'benchmarks'
)
# jax device_kind substrings -> hardware presets, checked in order (e.g. 'NVIDIA H100 80GB HBM3').
DEVICE_KIND_PRESETS = (
  ('gb200', 'gb200'),
  ('h200', 'h200'),
  ('h800', 'h800'),
  ('h100', 'h100'),
  ('a100', 'a100_80g'),
)
# parallel.hardware='auto' on a device whose kind names no preset (CPU, other GPUs).
FALLBACK_HARDWARE = 'h100'


def device_slug(device_kind: str) -> str:
  """A device_kind as bench/ names files: 'NVIDIA H100 80GB HBM3' -> nvidia_h100_80gb_hbm3."""
  return re.sub(r'[^a-z0-9]+', '_', device_kind.lower()).strip('_')


def hardware_for_device(
  device_kind: str,
  setting: str = 'auto',
  dtype: str = 'bfloat16',
  calibration_dir: str = CALIBRATION_DIR,
) -> tuple[Hardware, Calibration | None, str]:
  """The hardware `parallel.hardware` names for a device; returns (hw, calibration, description).

  setting 'auto': the preset of the device kind (h100, h200, a100, ...) with the measured rates
  and kernel timings of `<calibration_dir>/<device>_calibration.json` when that file exists, the
  datasheet otherwise; a kind that names no preset (CPU) gets FALLBACK_HARDWARE. Any other
  setting is a preset name or a JSON file of figures (`load_hardware`), used as is.
  Raises ValueError (one line) for a setting that is neither.
  """
  if setting != 'auto':
    if setting not in HARDWARE and not os.path.isfile(setting):
      raise ValueError(
        f'parallel.hardware={setting!r} is neither a preset {sorted(HARDWARE)} nor a JSON file'
      )
    try:
      hw = load_hardware(setting)
    except (OSError, ValueError, TypeError, KeyError) as e:
      raise ValueError(f'parallel.hardware={setting!r}: {type(e).__name__}: {e}') from None
    return hw, None, f'{hw.name} (parallel.hardware={setting})'
  kind = device_kind.lower()
  preset = next((p for key, p in DEVICE_KIND_PRESETS if key in kind), None)
  if preset is None:
    return (
      HARDWARE[FALLBACK_HARDWARE],
      None,
      f'{FALLBACK_HARDWARE} datasheet (device kind {device_kind!r} names no preset; '
      f'parallel.hardware=auto falls back to {FALLBACK_HARDWARE})',
    )
  hw = HARDWARE[preset]
  path = os.path.join(calibration_dir, f'{device_slug(device_kind)}_calibration.json')
  if not os.path.isfile(path):
    return hw, None, f'{preset} datasheet ({device_kind})'
  cal = Calibration.load(path)
  hw, _ = cal.apply(hw, dtype)
  return hw, cal, f'{preset} calibrated by {os.path.relpath(path)}'


def _parse_split(p: Prediction) -> tuple[int, int]:
  a, f = p.split.split(':')
  return int(a), int(f)


def choose_ma_sep_split(
  m: ModelSpec,
  hw: Hardware,
  w: Workload,
  n_devices: int,
  cal: Calibration | None = None,
  attn_devices: int | None = None,
  moe_devices: int | None = None,
  microbatches: int | None = None,
  **split_options,
) -> tuple[Prediction, list[Prediction], str]:
  """The best valid ma_sep split of n_devices for a workload: what `attn_devices=auto` runs.

  Every split a:(n - a) the strategy accepts (`ma_sep.invalid`) is predicted at its best
  micro-batch count (`best_ma_sep`) and ranked like `plan` (placements that fit first, then step
  time). Arguments given (not None) are held fixed: `attn_devices` / `moe_devices` keep only the
  splits with that count, `microbatches` is the only M tried (None: MICROBATCH_CHOICES).
  `split_options` go to `ma_sep.Split` (dispatch, hierarchical, attn_sharding).

  Returns:
    (best, ranked, reason): the best prediction, every valid split's best prediction best first,
    and one line saying why the best wins (its margin, the busier role from `.busy`, and the
    largest term from `.bound`).

  Raises:
    ValueError: one line naming the device count, when no split is valid.
  """
  choices = MICROBATCH_CHOICES if microbatches is None else (microbatches,)
  ranked = []
  for a in range(1, n_devices):
    if attn_devices is not None and a != attn_devices:
      continue
    if moe_devices is not None and n_devices - a != moe_devices:
      continue
    p = best_ma_sep(m, hw, w, a, n_devices - a, cal, choices, **split_options)
    if p is not None:
      ranked.append(p)
  ranked.sort(key=_rank)
  if not ranked:
    fixed = [
      f'{name}={value}'
      for name, value in (
        ('attn_devices', attn_devices),
        ('moe_devices', moe_devices),
        ('num_microbatches', microbatches),
      )
      if value is not None
    ]
    held = f' with {", ".join(fixed)}' if fixed else ''
    raise ValueError(
      f'no valid ma_sep split of {n_devices} devices{held} (model.num_experts='
      f'{m.num_experts}, {w.batch // max(1, w.accumulation)} sequences per accumulation step, '
      f'seq_len {m.seq_len})'
    )
  return ranked[0], ranked, _reason(ranked)


_ROLE_DEVICES = {'attention': 'attention devices', 'experts': 'expert devices'}


def _reason(ranked: list[Prediction]) -> str:
  """One line: why ranked[0] wins (margin over the next, busier role, largest term)."""
  best = ranked[0]
  head = f'{best.split} with M={best.microbatches}'
  if len(ranked) == 1:
    why = f'{head} is the only valid split ({best.step_s:.4g} s/step predicted)'
  else:
    second = ranked[1]
    if best.fits and not second.fits:
      margin = f'the only one that fits in memory (next: {second.split}, which does not)'
    else:
      gain = (second.step_s - best.step_s) / second.step_s
      margin = (
        f'{gain:.1%} faster than {second.split} (M={second.microbatches}, {second.step_s:.4g} s)'
      )
    why = f'{head} wins at {best.step_s:.4g} s/step predicted, {margin}'
  busier = max(best.busy, key=best.busy.get)
  other = min(best.busy, key=best.busy.get)
  top = max(best.terms, key=lambda t: t.time_s)
  why += (
    f'; the {_ROLE_DEVICES[busier]} are the busier role (busy {best.busy[busier]:.0%} of the '
    f'step, the {_ROLE_DEVICES[other]} {best.busy[other]:.0%}) and the largest term is '
    f'{best.bound} ({top.time_s:.4g} s, {top.time_s / best.step_s:.0%} of the step)'
  )
  if not best.fits:
    why += '; no valid split fits in memory per the model'
  return why


def describe_ma_sep_choice(
  best: Prediction,
  ranked: list[Prediction],
  reason: str,
  n_devices: int,
  hardware: str,
  accumulation: int = 1,
  top: int = 3,
) -> str:
  """The log block of an `auto` choice: the top ranked splits, then the reason (several lines).

  `accumulation` is the run's train.grad_accum_steps: a best split that the model predicts needs
  more chunks to fit in memory gets a note.
  """
  lines = [
    f'ma_sep split chosen by the planner (mas_jax.perf) for {n_devices} devices on {hardware}; '
    f'{len(ranked)} valid splits, top {min(top, len(ranked))}:',
    f'  {"rank":>4}  {"split":>6}  {"M":>2}  {"accum":>5}  {"step (s)":>10}  '
    f'{"busy attn/experts":>17}  {"fits":>4}  bound',
  ]
  for i, p in enumerate(ranked[:top], 1):
    busy = f'{p.busy["attention"]:.0%} / {p.busy["experts"]:.0%}'
    lines.append(
      f'  {i:>4}  {p.split:>6}  {p.microbatches:>2}  {p.accumulation:>5}  {p.step_s:>10.4g}  '
      f'{busy:>17}  {"yes" if p.fits else "no":>4}  {p.bound}'
    )
  lines.append(f'  Chosen: {reason}.')
  if best.accumulation > accumulation:
    lines.append(
      f'  Note: the model predicts {best.split} fits in memory only with {best.accumulation} '
      f'accumulation chunks; the run uses train.grad_accum_steps={accumulation}.'
    )
  return '\n'.join(lines)
