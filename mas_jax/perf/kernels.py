"""Per-device kernel times: the roofline, the optimizer update, and one layer's attention, experts
and output head (calibration where measured, roofline elsewhere), and the elementwise and cast
HBM traffic around them.

Elementwise and cast traffic (`Kernels.layer_elementwise`, `moe_elementwise`, `head_elementwise`,
`weight_casts`) is counted from first principles, in bytes moved through HBM at the (measured)
HBM rate, never fitted to measured steps. The counting rule: XLA fuses each chain of elementwise
ops (and the reductions they feed) into one kernel that reads each input once and writes each
output once; matmuls (cuBLAS / cuDNN / the grouped kernel) read their operands from HBM in the
compute dtype, so a cast feeding a matmul is a pass of its own; an elementwise consumer absorbs a
cast (the bf16 -> fp32 gradient casts fuse into the gradient accumulator, the clip's norm and
AdamW, whose bytes are counted by `accumulator_update` / `optimizer_update` at fp32 width, so they
add nothing here). A backward pass of an elementwise op reads the output gradient and what the
forward saved and writes the input gradient: counted as 2 x the forward's bytes. What the
calibrated kernels already include (the attention block's RoPE and projection-weight casts, the
expert FFN's GELU) is not counted again. Per token (d = d_model, b = compute-dtype bytes):
  layer (attention side): RMSNorm before attention (read x, write h: 2 d b), residual add fused
    with the RMSNorm before the MoE (read x, attention output; write x, h: 4 d b), residual add
    after the MoE (read x, MoE output; write x: 3 d b): NORM_RESIDUAL_PASSES = 9 passes of d b;
  MoE (per routed token-expert pair, per computed slot): capacity dispatch writes the zeroed
    [E, C, D] buffer (slots x d b) and scatters the routed rows into it (read + write d b per
    pair); the dropless path, and capacity routing on grouped matmuls, gathers the rows sorted
    by expert (read + write d b per pair);
    combine gathers each pair's output (d b per pair) and writes one row per token (d b); expert
    dropout reads and writes the hidden of every computed slot (2 F b per slot; the mask's random
    bits are generated inside that kernel);
  head: the final RMSNorm (2 d b), the embedding gather (fp32 row read, compute-dtype write:
    (4 + b) d) and its gradient's scatter-add into fp32 rows (read b d, read-modify-write 8 d),
    and the loss over fp32 logits [T, V]: the logits written once in fp32, read by the forward's
    log-softmax, read again by the backward, which writes compute-dtype logit gradients
    (CROSS_ENTROPY_BYTES_PER_LOGIT = 4 + 4 + 4 + b); per chunk, the zeroed fp32 embedding
    gradient (4 V d);
  weight casts: each forward pass casts every fp32 matmul weight to the compute dtype before the
    matmul (read 4 B, write b B per parameter; recomputed with remat='full', since the cast sits
    inside the rematerialised block); the expert weights of the calibrated einsum were bf16 when
    timed, so their cast is not in the calibration.
"""

from __future__ import annotations

import math

from mas_jax.perf.calibration import Calibration
from mas_jax.perf.hardware import Hardware
from mas_jax.perf.model import ModelSpec, expected_active
from mas_jax.perf.prediction import (
  ACCUMULATOR_BYTES_PER_PARAM,
  FUSED_ACCUMULATOR_BYTES_PER_PARAM,
  OPTIMIZER_BYTES_PER_PARAM,
  Cost,
  Workload,
  optimizer_bytes_per_param,
)


def roofline(flops: float, nbytes: float, hw: Hardware, dtype: str) -> Cost:
  """Time of a kernel that does `flops` and moves `nbytes` through HBM."""
  t_compute, t_memory = flops / hw.peak_flops(dtype), nbytes / hw.hbm_bw
  return Cost(t_compute, 'compute') if t_compute >= t_memory else Cost(t_memory, 'hbm')


def optimizer_update(params: float, hw: Hardware, m: ModelSpec | None = None) -> Cost:
  """One optimizer step over `params` parameters held by a device: HBM-bound elementwise (with
  model m's train.mu_dtype; None: float32 moments)."""
  per_param = OPTIMIZER_BYTES_PER_PARAM if m is None else optimizer_bytes_per_param(m)
  return Cost(params * per_param / hw.hbm_bw, 'hbm')


def accumulator_update(params: float, accum: int, hw: Hardware, fused: float = 0.0) -> Cost:
  """fp32 gradient accumulator read-modify-write once per chunk when accum > 1 (HBM-bound);
  `fused` of the `params` are added into it by their weight-gradient GEMMs
  (train.fuse_grad_accum), which moves fewer bytes."""
  if accum <= 1:
    return Cost(0.0, 'hbm')
  nbytes = (
    params - fused
  ) * ACCUMULATOR_BYTES_PER_PARAM + fused * FUSED_ACCUMULATOR_BYTES_PER_PARAM
  return Cost(accum * nbytes / hw.hbm_bw, 'hbm')


# See the module docstring for what each counts.
NORM_RESIDUAL_PASSES = 9
FP32_BYTES = 4
ELEMENTWISE_BACKWARD = 2.0  # backward bytes of an elementwise op / its forward bytes


def elementwise_passes(m: ModelSpec, w: Workload) -> float:
  """Elementwise traffic of a block per step in forward passes: the forward, the backward
  (ELEMENTWISE_BACKWARD) and the recomputed forward under remat='full'."""
  if not w.train:
    return 1.0
  return 1.0 + ELEMENTWISE_BACKWARD + (1.0 if m.remat == 'full' else 0.0)


def cast_passes(m: ModelSpec, w: Workload) -> float:
  """Forward passes that cast fp32 weights: one, two under remat='full'; none in decode, whose
  weights are held in the compute dtype."""
  if not w.train:
    return 0.0
  return 2.0 if m.remat == 'full' else 1.0


def cross_entropy_bytes_per_logit(act_bytes: int) -> float:
  """fp32 logits written, read by the forward's log-softmax and by the backward, which writes the
  logit gradient in the compute dtype."""
  return 3 * FP32_BYTES + act_bytes


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
    dropless = m.routed_rows_only or w.mode == 'decode'
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

  # Elementwise and cast traffic (module docstring). Each returns a Cost at the HBM rate.

  def layer_elementwise(self, w: Workload, seqs: float) -> Cost:
    """Forward norms and residual adds of one layer on `seqs` sequences (full width)."""
    m = self.m
    tokens = seqs * (w.context if w.train else 1)
    nbytes = tokens * NORM_RESIDUAL_PASSES * m.d_model * m.act_bytes
    return Cost(nbytes / self.hw.hbm_bw, 'hbm')

  def moe_elementwise(
    self, w: Workload, tokens: float, pairs: float, slots: float, hidden: int, dropout: float
  ) -> Cost:
    """Forward dispatch, combine and expert dropout of one layer: `tokens` tokens whose `pairs`
    routed token-expert pairs fill `slots` computed rows (capacity slots, or = pairs dropless)."""
    m = self.m
    row = m.d_model * m.act_bytes
    # Generation is always dropless; grouped experts gather the kept pairs as dropless does.
    dropless = m.routed_rows_only or not w.train
    dispatch = 2 * pairs * row + (0 if dropless else slots * row)
    combine = pairs * row + tokens * row
    drop = 2 * slots * hidden * m.act_bytes if (w.train and dropout > 0) else 0.0
    return Cost((dispatch + combine + drop) / self.hw.hbm_bw, 'hbm')

  def head_elementwise(self, w: Workload, seqs: float, vocab_share: float = 1.0) -> Cost:
    """One chunk's final norm, embedding gather and loss, forward and backward (training), or
    the final norm and embedding gather (decode)."""
    m = self.m
    tokens = seqs * (w.context if w.train else 1)
    d, b, v = m.d_model, m.act_bytes, m.vocab_size * vocab_share
    fwd = tokens * (2 * d * b + (FP32_BYTES + b) * d)
    if not w.train:
      return Cost(fwd / self.hw.hbm_bw, 'hbm')
    norm_bwd = ELEMENTWISE_BACKWARD * tokens * 2 * d * b
    embed_bwd = tokens * (b + 2 * FP32_BYTES) * d + FP32_BYTES * m.vocab_size * d
    loss = tokens * v * cross_entropy_bytes_per_logit(b)
    return Cost((fwd + norm_bwd + embed_bwd + loss) / self.hw.hbm_bw, 'hbm')

  def weight_casts(self, params: float, forward_passes: float = 1.0) -> Cost:
    """fp32 -> compute-dtype casts of `params` matmul weights, once per forward pass."""
    nbytes = forward_passes * params * (FP32_BYTES + self.m.act_bytes)
    return Cost(nbytes / self.hw.hbm_bw, 'hbm')
