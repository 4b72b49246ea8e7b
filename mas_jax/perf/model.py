"""The model's shape and its accounting: parameters, FLOPs and bytes (shared with metrics.py).

FLOP convention (used for MFU across the project):
  forward FLOPs per token = 2 * N_matmul + L * 4 * c * D, where N_matmul counts the active matmul
  parameters (wq, wk, wv, wo, router, top_k experts, unembedding; not the embedding lookup, not
  norms) and c is the number of keys a query attends to. Training is causal, so c = S / 2 (the
  mean over positions); decode at context c counts all c keys. Training = 3 x forward, i.e.
  6 * N_matmul + 6 * L * S * D per token (the PaLM 12 * L * S * D, halved for causal masking).
  Recomputation and capacity padding are not model FLOPs; padding is charged to time instead.
metrics.py computes MFU from these functions.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

_DTYPE_BYTES = {'float32': 4, 'bfloat16': 2, 'float16': 2, 'float8': 1, 'fp8': 1}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """The MoE transformer's shape: [V,D] embedding, L x (attention, MoE), [D,V] unembedding."""

  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  num_experts: int
  top_k: int
  expert_hidden: int
  n_mat: int = 2  # matrices per expert: 2 for GELU/ReLU, 3 for SwiGLU
  compute_dtype: str = 'bfloat16'
  capacity_factor: float = 1.25
  dropless: bool = False
  seq_len: int = 2048
  batch_size: int = 1024
  remat: str = 'none'  # model.remat: 'full' recomputes each block's forward in the backward
  expert_dropout: float = 0.0  # model.expert_dropout (training only)
  # False: cuDNN flash attention, no scores in memory. True: the blockwise XLA attention
  # (model.attention_impl='xla'), whose float32 tile of `attention_block` keys per (head, query)
  # is live while a block runs.
  attention_scores: bool = False
  # Measured share of the routed token-expert pairs per expert (sums to 1; None: uniform), e.g.
  # a run's expert_load_<e> metrics (`loads_from_metrics`). Only dropless routing (and decode,
  # which is always dropless) computes what is routed; capacity routing computes fixed buffers.
  expert_loads: tuple[float, ...] | None = None
  # True: the experts sit where ma_sep's re-placement (parallel.rebalance_every) puts them for
  # these loads (`lpt_placement` for each expert-device count); False: expert e in slot e
  # (contiguous experts per device).
  rebalanced: bool = False
  # True: a device holding all experts runs them as grouped matmuls over the kept pairs
  # (model.expert_impl 'ragged_dot' or 'mosaic_gpu'; `moe.grouped_expert_ffn`), so capacity
  # routing computes no padding either; the calibration's grouped-kernel (dropless) timings apply.
  grouped_experts: bool = False
  # Bytes of AdamW's first moment (train.mu_dtype: 4 float32, 2 bfloat16); the second is float32.
  mu_bytes: int = 4

  def imbalance(self, devices: int, replaces: bool = True) -> float:
    """Routed pairs of the busiest of `devices` expert devices (the experts of its slots) over
    the mean: 1 when uniform, the AFD paper's imbalance factor otherwise. `replaces`: whether
    the strategy re-places experts (ma_sep does; ep does not), so `rebalanced` applies."""
    if not self.expert_loads or devices <= 1:
      return 1.0
    per = len(self.expert_loads) // devices
    slots = range(len(self.expert_loads))
    if self.rebalanced and replaces:
      slots = lpt_placement(self.expert_loads, per)
    shares = [0.0] * devices
    for load, slot in zip(self.expert_loads, slots, strict=True):
      shares[slot // per] += load
    return max(shares) * devices / sum(shares)

  def capacity_slots(self, tokens: int) -> int:
    """Slots per expert of a group of `tokens` tokens (mas_jax.layers.moe.capacity)."""
    if self.dropless:
      return tokens
    return min(tokens, math.ceil(self.capacity_factor * tokens * self.top_k / self.num_experts))

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def act_bytes(self) -> int:
    """Bytes of one value in the compute dtype (activations, decode weights, KV cache)."""
    return _DTYPE_BYTES[self.compute_dtype]

  @property
  def routed_rows_only(self) -> bool:
    """Whether the experts compute the routed pairs only: dropless routing, or grouped matmuls
    (which skip capacity's padding, and whose timings the calibration keys as dropless)."""
    return self.dropless or self.grouped_experts

  def on_capacity_buffers(self) -> ModelSpec:
    """This spec for a strategy that moves expert buffers between devices (ep > 1, tp_pp,
    ma_sep): those run the einsum, never grouped matmuls (config.validate)."""
    return dataclasses.replace(self, grouped_experts=False) if self.grouped_experts else self

  @property
  def capacity(self) -> float:
    """Expert slots computed per routed token-expert pair (padding of fixed capacity)."""
    return 1.0 if self.routed_rows_only else self.capacity_factor

  @classmethod
  def from_config(cls, config: Any) -> ModelSpec:
    """Builds the spec from a config (ml_collections or mas_jax.config.Config) with `model` and
    `data` sections."""
    m = config.model
    return cls(
      vocab_size=m.vocab_size,
      num_layers=m.num_layers,
      d_model=m.d_model,
      num_heads=m.num_heads,
      num_experts=m.num_experts,
      top_k=m.top_k,
      expert_hidden=m.expert_hidden,
      n_mat=3 if m.activation in ('swiglu', 'geglu') else 2,
      compute_dtype=m.compute_dtype,
      capacity_factor=getattr(m, 'capacity_factor', 1.25),
      dropless=getattr(m, 'dropless', False),
      seq_len=config.data.seq_len,
      batch_size=config.data.batch_size,
      remat=getattr(m, 'remat', 'none'),
      expert_dropout=float(getattr(m, 'expert_dropout', 0.0)),
      attention_scores=getattr(m, 'attention_impl', 'auto') == 'xla',
      grouped_experts=getattr(m, 'expert_impl', 'auto') in ('ragged_dot', 'mosaic_gpu'),
      mu_bytes=_DTYPE_BYTES[getattr(getattr(config, 'train', None), 'mu_dtype', 'float32')],
    )


def attn_params_per_layer(m: ModelSpec) -> int:
  """wq, wk, wv [D,N,H], wo [N,H,D] and the two RMSNorm scales of a block."""
  return 4 * m.d_model * m.num_heads * m.head_dim + 2 * m.d_model


def expert_params(m: ModelSpec) -> int:
  """One expert's w_in [D,F] and w_out [F,D] (three matrices if gated)."""
  return m.n_mat * m.d_model * m.expert_hidden


def moe_params_per_layer(m: ModelSpec) -> int:
  """Router [D,E] and all E experts."""
  return m.d_model * m.num_experts + m.num_experts * expert_params(m)


def embed_params(m: ModelSpec) -> int:
  """Embedding [V,D], untied unembedding [D,V] and the final RMSNorm."""
  return 2 * m.vocab_size * m.d_model + m.d_model


def total_params(m: ModelSpec) -> int:
  return m.num_layers * (attn_params_per_layer(m) + moe_params_per_layer(m)) + embed_params(m)


def active_matmul_params(m: ModelSpec) -> int:
  """Matmul parameters one token touches: N_matmul of the FLOP convention."""
  d = m.d_model
  per_layer = 4 * d * m.num_heads * m.head_dim + d * m.num_experts + m.top_k * expert_params(m)
  return m.num_layers * per_layer + d * m.vocab_size


def attn_core_flops(m: ModelSpec, keys: float) -> float:
  """Forward QK^T and PV FLOPs of one token in one layer attending to `keys` keys."""
  return 4.0 * keys * m.num_heads * m.head_dim


def forward_flops_per_token(m: ModelSpec, context: float, causal: bool) -> float:
  """Model FLOPs of one token's forward pass (see the module docstring)."""
  keys = context / 2 if causal else context
  return 2.0 * active_matmul_params(m) + m.num_layers * attn_core_flops(m, keys)


def train_flops_per_token(m: ModelSpec) -> float:
  """6 * N_matmul + 6 * L * S * D: forward + backward, causal, no recomputation."""
  return 3.0 * forward_flops_per_token(m, m.seq_len, causal=True)


def layer_flops_per_token(m: ModelSpec, context: float, causal: bool) -> dict[str, float]:
  """Forward FLOPs of one token in one layer, attention (with router) vs experts."""
  keys = context / 2 if causal else context
  attn = 8.0 * m.d_model * m.num_heads * m.head_dim + attn_core_flops(m, keys)
  attn += 2.0 * m.d_model * m.num_experts
  return {'attention': attn, 'moe': 2.0 * m.top_k * expert_params(m)}


def kv_bytes_per_token_layer(m: ModelSpec) -> float:
  """K and V of one token in one layer, all heads, compute dtype."""
  return 2.0 * m.num_heads * m.head_dim * m.act_bytes


def attn_act_bytes_per_token(m: ModelSpec, head_share: float = 1.0) -> float:
  """Activations saved for backward by one layer's attention, per token (flash attention).

  The residual input, its norm and the attention output after wo are full width; q, k, v and
  the pre-wo output scale with the share of heads a device holds.
  """
  return m.act_bytes * m.d_model * (3 + 4 * head_share)


# The blockwise XLA attention's tiles: the fewest equal blocks of at most this many rows
# (mas_jax.layers.attention.attention_block_size, which a test keeps equal to `attention_block`).
ATTENTION_MAX_BLOCK = 512


def attention_block(seq_len: int) -> int:
  """Keys per tile of the blockwise XLA attention for a sequence of seq_len tokens."""
  blocks = -(-seq_len // ATTENTION_MAX_BLOCK)
  return -(-seq_len // blocks)


def layer_act_bytes_per_token(m: ModelSpec, head_share: float = 1.0, hidden_share: float = 1.0):
  """Everything one layer's forward keeps for its backward, per token: the attention's (with the
  float32 score tile of XLA attention) and the MoE's, whose hidden width is split `hidden_share`."""
  scores = m.num_heads * head_share * attention_block(m.seq_len) * 4 if m.attention_scores else 0
  pairs = m.top_k * m.capacity
  hidden = m.act_bytes * pairs * 2 * m.expert_hidden * (m.n_mat - 1) * (1 - hidden_share)
  return attn_act_bytes_per_token(m, head_share) + scores + moe_act_bytes_per_token(m) - hidden


def moe_act_bytes_per_token(m: ModelSpec) -> float:
  """Activations saved by one MoE layer per token: norm input, fp32 router logits, and per
  routed (capacity-padded) pair the expert input, pre- and post-activation hidden, output."""
  pairs = m.top_k * m.capacity
  per_pair = 2 * m.d_model + 2 * m.expert_hidden * (m.n_mat - 1)
  return m.act_bytes * (m.d_model + pairs * per_pair) + 4.0 * m.num_experts


def accounting(m: ModelSpec) -> dict[str, float]:
  """Parameters, FLOPs and bytes of the model, attention and MoE separately."""
  b = m.act_bytes
  layer = layer_flops_per_token(m, m.seq_len, causal=True)
  return {
    'params_total': total_params(m),
    'params_attention_per_layer': attn_params_per_layer(m),
    'params_moe_per_layer': moe_params_per_layer(m),
    'params_embedding': embed_params(m),
    'params_active_matmul': active_matmul_params(m),
    'flops_fwd_attention_per_token_layer': layer['attention'],
    'flops_fwd_moe_per_token_layer': layer['moe'],
    'flops_train_per_token': train_flops_per_token(m),
    'bytes_attention_weights_per_layer': attn_params_per_layer(m) * b,
    'bytes_moe_weights_per_layer': moe_params_per_layer(m) * b,
    'bytes_kv_per_token_layer': kv_bytes_per_token_layer(m),
    'bytes_act_attention_per_token_layer': attn_act_bytes_per_token(m),
    'bytes_act_moe_per_token_layer': moe_act_bytes_per_token(m),
  }


def expected_active(experts: float, tokens: float, m: ModelSpec) -> float:
  """Expected number of `experts` used by `tokens` tokens routed uniformly top_k of E."""
  unused = (m.num_experts - m.top_k) / m.num_experts
  return experts * (1.0 - unused**tokens)


def hit_probability(local: float, m: ModelSpec) -> float:
  """Probability that a token's top_k experts include one of `local` given experts."""
  miss = 1.0
  for i in range(m.top_k):
    miss *= max(0.0, (m.num_experts - local - i) / (m.num_experts - i))
  return 1.0 - miss


def lpt_placement(loads, per_device: int) -> list[int]:
  """The expert -> slot table of ma_sep's re-placement (mas_jax/rebalance.py): experts by load,
  heaviest first (ties: the lower id), each to the least loaded expert device with a free slot
  (ties: the lower device), in that device's next free slot."""
  n = len(loads) // per_device
  total, filled = [0.0] * n, [0] * n
  placement = [0] * len(loads)
  for e in sorted(range(len(loads)), key=lambda e: (-loads[e], e)):
    d = min((d for d in range(n) if filled[d] < per_device), key=lambda d: (total[d], d))
    placement[e] = d * per_device + filled[d]
    total[d] += loads[e]
    filled[d] += 1
  return placement


def loads_from_metrics(path: str, last: int = 10) -> tuple[float, ...]:
  """Mean expert load fractions (expert_load_<e>) of the last `last` lines of a run's
  metrics.jsonl that carry them."""
  rows = []
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      loads = {int(k.rsplit('_', 1)[1]): v for k, v in row.items() if k.startswith('expert_load_')}
      if loads and all(v is not None for v in loads.values()):
        rows.append([loads[e] for e in sorted(loads)])
  if not rows:
    raise ValueError(f'{path} has no expert_load_<e> metrics')
  rows = rows[-last:]
  return tuple(sum(col) / len(rows) for col in zip(*rows, strict=True))
