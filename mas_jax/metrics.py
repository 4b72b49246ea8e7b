"""FLOP accounting, MFU, and the metric writers (metrics.jsonl and TensorBoard).

FLOP convention (model FLOPs, the one MaxText and Megatron-Core report; recomputation is not
counted):
  training FLOPs per token = 6 * active matmul parameters per token
                           + 6 * L * T * D          (attention scores and values: 2 matmuls of
                                                     2 * T * D each per token and layer forward,
                                                     x3 for forward + backward, halved because
                                                     causal attention needs half the pairs)
  active matmul parameters per token = L * (4 * D * N * H  + D * E  + top_k * 2 * D * F) + D * V
    (q, k, v, o projections; router; the top_k experts a token visits; the output head). The
    embedding lookup is a gather, not a matmul, and is not counted.
"""

from __future__ import annotations

import json
import math
import os

from absl import logging

from mas_jax.config import ModelConfig

# Dense bf16 datasheet peaks (FLOP/s) per device, matched against jax device_kind, for MFU.
PEAK_FLOPS = {'h100': 989e12, 'h200': 989e12, 'a100': 312e12}


def param_count(cfg: ModelConfig) -> dict[str, int]:
  """Parameter counts: total, attention, moe, embeddings, and active per token."""
  d, n, h, e, f, v, n_layers = (
    cfg.d_model,
    cfg.num_heads,
    cfg.head_dim,
    cfg.num_experts,
    cfg.expert_hidden,
    cfg.vocab_size,
    cfg.num_layers,
  )
  attn = n_layers * (4 * d * n * h + d)  # projections + norm scale
  moe = n_layers * (d * e + 2 * e * d * f + d)  # router + experts + norm scale
  embed = 2 * v * d + d  # embedding, output head, final norm
  active_matmul = n_layers * (4 * d * n * h + d * e + cfg.top_k * 2 * d * f) + d * v
  return {
    'total': attn + moe + embed,
    'attention': attn,
    'moe': moe,
    'embeddings': embed,
    'active_matmul': active_matmul,
  }


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Model FLOPs of one training token (forward + backward), convention in the module doc."""
  return 6.0 * param_count(cfg)['active_matmul'] + 6.0 * cfg.num_layers * seq_len * cfg.d_model


def peak_flops(device_kind: str) -> float | None:
  """Datasheet dense bf16 peak of a JAX device_kind string, or None when unknown (e.g. CPU)."""
  kind = device_kind.lower()
  for name, peak in PEAK_FLOPS.items():
    if name in kind:
      return peak
  return None


def _finite_or_none(value):
  """NaN and inf are not JSON: they are written as null."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


class MetricWriter:
  """Appends one JSON object per call to <workdir>/metrics.jsonl and the scalars to TensorBoard.

  Non-finite values (a diverged loss) are written as null, so every line stays valid JSON.

  TensorBoard needs TensorFlow (flax.metrics.tensorboard); without it, or with
  tensorboard=False (`train.tensorboard`), only the JSONL is written.
  Only process 0 writes.
  """

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')  # noqa: SIM115
    if not tensorboard:
      return
    try:
      from flax.metrics import tensorboard

      self._tb = tensorboard.SummaryWriter(os.path.join(workdir, 'tensorboard'))
    except ImportError:
      logging.info('TensorFlow is not installed: no TensorBoard summaries, metrics.jsonl only.')

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    scalars = {k: _finite_or_none(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({'step': step, **scalars}, allow_nan=False) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      for name, value in scalars.items():
        if value is not None:
          self._tb.scalar(name, value, step)
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
