"""The planner: every valid strategy and split of a device count, ranked by predicted step time.

Only placements the strategies accept are considered (their ConfigErrors are mirrored by each
cost model's `invalid`), so the best split is one `train.py` can run.
"""

from __future__ import annotations

from typing import Any

from mas_jax.perf import ep as ep_model
from mas_jax.perf import ma_sep as ma_sep_model
from mas_jax.perf import tp_pp as tp_pp_model
from mas_jax.perf.calibration import Calibration
from mas_jax.perf.hardware import Hardware
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
  config: Any, hw: Hardware, n_devices: int, cal: Calibration | None = None
) -> Prediction:
  """The prediction of the placement a config asks for on n_devices (its strategy, split and
  micro-batches) at its batch and train.grad_accum_steps."""
  m = ModelSpec.from_config(config)
  p = config.parallel
  w = Workload('train', m.batch_size, m.seq_len, config.train.grad_accum_steps)
  if p.strategy == 'ma_sep':
    s = ma_sep_model.Split(
      p.attn_devices, p.moe_devices, p.num_microbatches, p.moe_dispatch, p.hierarchical_allreduce
    )
    return ma_sep_model.predict(m, hw, w, s, cal)
  if p.strategy == 'tp_pp':
    return tp_pp_model.predict(m, hw, w, p.tp, p.pp, p.num_microbatches, cal)
  if p.strategy == 'ep':
    return ep_model.predict(m, hw, w, n_devices, p.ep, cal)
  if p.strategy == 'dp':
    return ep_model.predict(m, hw, w, n_devices, 1, cal)
  return ep_model.predict(m, hw, w, 1, 1, cal)  # reference: one device
