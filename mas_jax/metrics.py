"""MFU, and the metric writers (metrics.jsonl and TensorBoard).

The FLOP and parameter accounting is the planner's (mas_jax.perf.model, convention in its module
docstring): model FLOPs, the convention MaxText and Megatron-Core report; recomputation and
capacity padding are not counted.
"""

from __future__ import annotations

import json
import math
import os
import types

from absl import logging

from mas_jax.config import ModelConfig
from mas_jax.perf import hardware as hardware_lib
from mas_jax.perf import model as perf_model

# jax device_kind substrings -> the planner's hardware presets (dense bf16 datasheet peaks).
_DEVICE_KINDS = {'h100': 'h100', 'h200': 'h200', 'a100': 'a100_80g'}


def _spec(cfg: ModelConfig, seq_len: int) -> perf_model.ModelSpec:
  data = types.SimpleNamespace(seq_len=seq_len, batch_size=1)
  return perf_model.ModelSpec.from_config(types.SimpleNamespace(model=cfg, data=data))


def param_count(cfg: ModelConfig) -> dict[str, int]:
  """Parameter counts: total, attention (with its norm), moe (router, experts, norm),
  embeddings (with the final norm), and active matmul parameters per token."""
  m = _spec(cfg, 1)
  attn = m.num_layers * (perf_model.attn_params_per_layer(m) - m.d_model)
  moe = m.num_layers * (perf_model.moe_params_per_layer(m) + m.d_model)
  return {
    'total': perf_model.total_params(m),
    'attention': attn,
    'moe': moe,
    'embeddings': perf_model.embed_params(m),
    'active_matmul': perf_model.active_matmul_params(m),
  }


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Model FLOPs of one training token (forward + backward, causal)."""
  return perf_model.train_flops_per_token(_spec(cfg, seq_len))


def peak_flops(device_kind: str) -> float | None:
  """Datasheet dense bf16 peak of a JAX device_kind string, or None when unknown (e.g. CPU)."""
  kind = device_kind.lower()
  for name, preset in _DEVICE_KINDS.items():
    if name in kind:
      return hardware_lib.HARDWARE[preset].bf16_flops
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
