"""Per-device kernel times: the roofline, the optimizer update, and one layer's attention, experts
and output head (calibration where measured, roofline elsewhere)."""

from __future__ import annotations

import math

from mas_jax.perf.calibration import Calibration
from mas_jax.perf.hardware import Hardware
from mas_jax.perf.model import ModelSpec, expected_active
from mas_jax.perf.prediction import (
  ACCUMULATOR_BYTES_PER_PARAM,
  OPTIMIZER_BYTES_PER_PARAM,
  Cost,
  Workload,
)


def roofline(flops: float, nbytes: float, hw: Hardware, dtype: str) -> Cost:
  """Time of a kernel that does `flops` and moves `nbytes` through HBM."""
  t_compute, t_memory = flops / hw.peak_flops(dtype), nbytes / hw.hbm_bw
  return Cost(t_compute, 'compute') if t_compute >= t_memory else Cost(t_memory, 'hbm')


def optimizer_update(params: float, hw: Hardware) -> Cost:
  """One optimizer step over `params` parameters held by a device: HBM-bound elementwise."""
  return Cost(params * OPTIMIZER_BYTES_PER_PARAM / hw.hbm_bw, 'hbm')


def accumulator_update(params: float, accum: int, hw: Hardware) -> Cost:
  """fp32 gradient accumulator read-modify-write once per chunk when accum > 1 (HBM-bound)."""
  if accum <= 1:
    return Cost(0.0, 'hbm')
  return Cost(accum * params * ACCUMULATOR_BYTES_PER_PARAM / hw.hbm_bw, 'hbm')


class Kernels:
  """Per-device kernel times of one layer: calibration where measured, roofline elsewhere."""

  def __init__(self, m: ModelSpec, hw: Hardware, cal: Calibration | None):
    self.m, self.hw, self.cal = m, hw, cal

  def attention(self, w: Workload, heads: float, seqs: float, weight_reads: float = 1.0) -> Cost:
    """Forward attention (projections, core, router) of `seqs` sequences over `heads` heads."""
    m, hd = self.m, self.m.head_dim
    train = w.mode == 'train'
    tokens = seqs * (w.context if train else 1)
    keys = w.context / 2 if train else w.context
    flops = tokens * (
      8 * m.d_model * hd * heads + 4 * keys * hd * heads + 2 * m.d_model * m.num_experts
    )
    nbytes = weight_reads * 4 * m.d_model * hd * heads * m.act_bytes
    if not train:
      nbytes += seqs * w.context * 2 * hd * heads * m.act_bytes  # read the KV cache
    cal = self.cal
    measured = cal.attention_time(m, w.mode, math.ceil(heads), seqs, w.context) if cal else None
    if measured is not None:
      return Cost(measured, 'measured', True)
    return roofline(flops, nbytes, self.hw, m.compute_dtype)

  def experts(
    self, w: Workload, local: float, pairs: float, routed_tokens: float, hidden: int
  ) -> Cost:
    """Forward FFN of `local` experts receiving `pairs` token-expert pairs (local width hidden)."""
    m = self.m
    flops = pairs * 2 * m.n_mat * m.d_model * hidden
    # Training reads every local expert; decode only those some token routed to.
    active = local if w.mode == 'train' else expected_active(local, routed_tokens, m)
    nbytes = (
      active * m.n_mat * m.d_model * hidden * m.act_bytes + pairs * 2 * m.d_model * m.act_bytes
    )
    # Calibration is keyed by routed pairs before capacity padding (see the module docstring).
    # Generation is always dropless (mas_jax/decode.py), whatever the model trained with.
    routed = pairs / m.capacity if w.mode == 'train' else pairs
    dropless = m.dropless or w.mode == 'decode'
    measured = self.cal.expert_time(m, local, routed, hidden, dropless) if self.cal else None
    if measured is not None:
      return Cost(measured, 'measured', True)
    return roofline(flops, nbytes, self.hw, m.compute_dtype)

  def head(self, w: Workload, seqs: float, vocab_share: float) -> Cost:
    """Forward unembedding of `seqs` sequences over a share of the vocabulary."""
    m = self.m
    tokens = seqs * (w.context if w.mode == 'train' else 1)
    flops = tokens * 2 * m.d_model * m.vocab_size * vocab_share
    nbytes = m.d_model * m.vocab_size * vocab_share * m.act_bytes
    return roofline(flops, nbytes, self.hw, m.compute_dtype)
