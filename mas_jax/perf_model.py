"""Analytic performance model of MoE training and decoding, per strategy, plus the AFD roofline.

Pure Python (no JAX): the planner must run anywhere, and a model of the program must not depend
on the program. Equations: ../shared/notes/perf_model.md §4 (MegaScale-Infer ping-pong, AFD
arXiv 2602.09721 Eq. 9-19 with the corrected Eq. 14-15).

FLOP convention (used for MFU across the project):
  forward FLOPs per token = 2 * N_matmul + L * 4 * c * D, where N_matmul counts the active matmul
  parameters (wq, wk, wv, wo, router, top_k experts, unembedding; not the embedding lookup, not
  norms) and c is the number of keys a query attends to. Training is causal, so c = S / 2 (the
  mean over positions); decode at context c counts all c keys. Training = 3 x forward, i.e.
  6 * N_matmul + 6 * L * S * D per token (the PaLM 12 * L * S * D, halved for causal masking).
  Recomputation and capacity padding are not model FLOPs; padding is charged to time instead.

Time model: every kernel is max(FLOPs / peak, HBM bytes / bandwidth); collectives are
hierarchical (NVLink inside a node, each GPU's own NIC across nodes) plus a per-hop latency.
Devices are placed contiguously: attention devices first, then expert devices, gpus_per_node to a
node. Each time term carries the resource that bounds it: compute, hbm, scale-up, scale-out or
latency. Training keeps fp32 parameters, fp32 gradients and two fp32 Adam moments (16 B/param),
no ZeRO; decode keeps weights in the compute dtype.

Optimizer update (training, every strategy): once per step, after the backward pass and any
gradient all-reduce, every device updates the parameters it holds. It is HBM-bound and charged as
the term `optimizer` (bound 'hbm'): OPTIMIZER_BYTES_PER_PARAM * params held / HBM bandwidth, where
the 32 B/param are AdamW's fp32 reads of param, grad, m, v and writes of param, m, v (28 B) plus
one read of the fp32 gradients for clip_by_global_norm's norm (4 B; the scaling fuses into the
update). Gradient accumulation does not repeat it; collectives are unchanged by it (the
all-reduce precedes it and cannot overlap it). With A > 1 accumulation chunks (at least the
config's train.grad_accum_steps, more if memory needs them) the term `grad_accumulation` adds the
fp32 accumulator's read-modify-write, A * 12 B per parameter held.
Not modelled: the fp32 -> bf16 weight casts and
the bf16 -> fp32 gradient casts (up to 6 + 6 B/param if XLA does not fuse them into the matmuls
and the update), elementwise kernels (norms, GELU, dropout, softmax cross-entropy), dispatch
scatter / combine gather and the embedding-gradient scatter.

Calibration JSON (written by a GPU benchmark; every field optional):
  {"device": "NVIDIA A100-SXM4-80GB",
   "matmul_tflops": 250.0,        # measured dense matmul rate in compute dtype -> peak FLOP/s
   "hbm_gbps": 1800.0,            # measured HBM bandwidth -> hbm_bw
   "scale_up_gbps": 250.0,        # measured per-GPU NVLink bandwidth, one direction
   "scale_out_gbps": 22.0,        # measured per-GPU network bandwidth, one direction
   "kernels": {
     "attention": [               # one layer's attention block on one device, no collectives
       {"mode": "decode", "heads": 3, "batch": 24, "seq": 2048, "time_s": 4.1e-5},
       {"mode": "train", "heads": 3, "batch": 8, "seq": 2048, "time_s": 2.0e-3}],
     "expert_ffn": [              # one layer's experts on one device
       {"local_experts": 4, "tokens": 48, "time_s": 5.3e-4}]}}
  attention: `heads` local heads, `batch` sequences, `seq` context (decode: one new token per
  sequence; train: forward over `seq` tokens, backward taken as 2 x forward). expert_ffn: `tokens`
  routed token-expert pairs reaching the device's `local_experts` experts, before capacity padding
  (the time includes whatever padding the kernel computes; bench/gpu_bench.py writes it so).
  Entries may also give "d_model", "head_dim", "expert_hidden" (local width) or "dropless"
  (expert_ffn: the routing the timing is for; the bench writes the capacity einsum and the grouped
  kernel apart); entries that disagree with the model are ignored. Decode looks up dropless
  timings whatever the model's routing, since generation is always dropless. bench/decode.py
  writes decode entries: attention = norm + cached attention over `seq` keys + the cache write,
  per layer; expert_ffn = the decode path's grouped kernel on `tokens` routed pairs.
  Timings are used for an exact match, or fitted linearly (time = k1 * x + k2, as MegaScale-Infer
  does) through the two nearest entries in batch / tokens with the other keys equal; with a
  single such entry, in proportion to batch / tokens (k2 = 0: these kernels are large enough for
  their launch cost not to count).
  Everything else stays modelled, and predictions list which terms were measured.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

# Training bytes per parameter: fp32 weight + fp32 gradient + fp32 Adam m and v.
TRAIN_BYTES_PER_PARAM = 16
# Gradients are synchronised in fp32 (parameters are fp32).
GRAD_BYTES = 4
# HBM traffic of the optimizer update per parameter held: AdamW reads fp32 param, grad, m, v and
# writes param, m, v (7 x 4 B); clip_by_global_norm reads the gradient once more for its norm.
ADAMW_BYTES_PER_PARAM = 28
CLIP_BYTES_PER_PARAM = 4
OPTIMIZER_BYTES_PER_PARAM = ADAMW_BYTES_PER_PARAM + CLIP_BYTES_PER_PARAM
# Gradient accumulation (train.grad_accum_steps > 1): every chunk reads the fp32 accumulator and
# the chunk's fp32 gradient and writes the accumulator.
ACCUMULATOR_BYTES_PER_PARAM = 12
# Fraction of HBM usable by weights, optimizer state and activations (the rest: runtime, buffers).
USABLE_HBM = 0.9


# ----------------------------------------------------------------------------------------------
# Hardware.


@dataclasses.dataclass(frozen=True)
class Hardware:
  """One GPU and its links. Bandwidths are bytes/s per GPU, one direction; FLOP/s dense peaks."""

  name: str
  bf16_flops: float
  fp8_flops: float
  hbm_bw: float
  hbm_bytes: float
  scale_up_bw: float
  scale_out_bw: float
  gpus_per_node: int
  scale_up_latency: float = 5e-6
  scale_out_latency: float = 10e-6

  def peak_flops(self, dtype: str) -> float:
    """Dense peak for a compute dtype; float32 matmuls are taken at the bf16 (TF32-class) rate."""
    return self.fp8_flops if dtype in ('float8', 'fp8') else self.bf16_flops


# Datasheet peaks, dense (no sparsity). NVLink: the per-direction half of the quoted total.
# Scale-out: one 200 Gb/s (A100) or 400 Gb/s (Hopper, Blackwell) NIC per GPU.
HARDWARE = {
  # A100 has no FP8 tensor cores: FP8 runs at the bf16 rate.
  'a100_80g': Hardware('a100_80g', 312e12, 312e12, 2.039e12, 80e9, 300e9, 25e9, 8),
  'h100': Hardware('h100', 989.4e12, 1978.9e12, 3.35e12, 80e9, 450e9, 50e9, 8),
  'h200': Hardware('h200', 989.4e12, 1978.9e12, 4.8e12, 141e9, 450e9, 50e9, 8),
  # H800: the export Hopper, NVLink cut to 400 GB/s total (the AFD paper sustains 160 of 200).
  'h800': Hardware('h800', 989.4e12, 1978.9e12, 3.35e12, 80e9, 200e9, 50e9, 8),
  # GB200 NVL72: a 72-GPU NVLink domain counts as one node.
  'gb200': Hardware('gb200', 2.5e15, 5.0e15, 8.0e12, 186e9, 900e9, 50e9, 72),
}


def load_hardware(name_or_path: str, overrides: dict[str, Any] | None = None) -> Hardware:
  """Returns a preset or a JSON file of figures, with `overrides` applied on top.

  Args:
    name_or_path: a key of HARDWARE, or a JSON file {"base": "<preset>", "<field>": value, ...}
      whose fields replace the base preset's (measured values).
    overrides: Hardware field name -> value.

  Returns:
    The Hardware.
  """
  if name_or_path in HARDWARE:
    hw = HARDWARE[name_or_path]
  else:
    with open(name_or_path) as f:
      figures = json.load(f)
    base = HARDWARE[figures.pop('base', 'a100_80g')]
    hw = dataclasses.replace(base, **figures)
  return dataclasses.replace(hw, **(overrides or {}))


# ----------------------------------------------------------------------------------------------
# Model accounting.

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

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def act_bytes(self) -> int:
    """Bytes of one value in the compute dtype (activations, decode weights, KV cache)."""
    return _DTYPE_BYTES[self.compute_dtype]

  @property
  def capacity(self) -> float:
    """Expert slots computed per routed token-expert pair (padding of fixed capacity)."""
    return 1.0 if self.dropless else self.capacity_factor

  @classmethod
  def from_config(cls, config: Any) -> ModelSpec:
    """Builds the spec from an ml_collections config with `model` and `data` sections."""
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
      capacity_factor=m.get('capacity_factor', 1.25),
      dropless=m.get('dropless', False),
      seq_len=config.data.seq_len,
      batch_size=config.data.batch_size,
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


# ----------------------------------------------------------------------------------------------
# Primitive times. Each returns (seconds, bounding resource).


def roofline(flops: float, nbytes: float, hw: Hardware, dtype: str) -> tuple[float, str]:
  """Time of a kernel that does `flops` and moves `nbytes` through HBM."""
  t_compute, t_memory = flops / hw.peak_flops(dtype), nbytes / hw.hbm_bw
  return (t_compute, 'compute') if t_compute >= t_memory else (t_memory, 'hbm')


def _largest(parts: dict[str, float]) -> tuple[float, str]:
  name = max(parts, key=parts.get)
  return parts[name], name


def optimizer_update(params: float, hw: Hardware) -> tuple[float, str]:
  """One optimizer step over `params` parameters held by a device: HBM-bound elementwise."""
  return params * OPTIMIZER_BYTES_PER_PARAM / hw.hbm_bw, 'hbm'


def accumulator_update(params: float, accum: int, hw: Hardware) -> tuple[float, str]:
  """fp32 gradient accumulator read-modify-write once per chunk when accum > 1 (HBM-bound)."""
  if accum <= 1:
    return 0.0, 'hbm'
  return accum * params * ACCUMULATOR_BYTES_PER_PARAM / hw.hbm_bw, 'hbm'


def all_reduce(nbytes: float, ranks: int, hw: Hardware) -> tuple[float, str]:
  """Hierarchical all-reduce of `nbytes` per rank over `ranks` contiguous GPUs.

  Reduce-scatter over NVLink inside a node, all-reduce of each 1/local shard across nodes over
  every GPU's own NIC, all-gather over NVLink: the bandwidth terms run one after the other.
  """
  if ranks <= 1 or nbytes <= 0:
    return 0.0, 'none'
  local = min(ranks, hw.gpus_per_node)
  nodes = math.ceil(ranks / hw.gpus_per_node)
  t_up = 2 * (local - 1) / local * nbytes / hw.scale_up_bw
  t_out = 2 * (nodes - 1) / nodes * nbytes / local / hw.scale_out_bw if nodes > 1 else 0.0
  latency = 2 * hw.scale_up_latency + (2 * hw.scale_out_latency if nodes > 1 else 0.0)
  _, bound = _largest({'scale-up': t_up, 'scale-out': t_out, 'latency': latency})
  return t_up + t_out + latency, bound


def all_to_all(nbytes: float, ranks: int, hw: Hardware) -> tuple[float, str]:
  """All-to-all where each rank sends `nbytes` spread evenly over the other ranks."""
  if ranks <= 1 or nbytes <= 0:
    return 0.0, 'none'
  local = min(ranks, hw.gpus_per_node)
  inside = nbytes * (local - 1) / (ranks - 1)
  t_up, t_out = inside / hw.scale_up_bw, (nbytes - inside) / hw.scale_out_bw
  latency = hw.scale_out_latency if ranks > local else hw.scale_up_latency
  t, bound = _largest({'scale-up': t_up, 'scale-out': t_out})
  return t + latency, bound if t > latency else 'latency'


def afd_exchange(
  m: ModelSpec, hw: Hardware, n_attn: int, n_moe: int, tokens: float
) -> dict[str, tuple[float, str]]:
  """Dispatch and combine of one layer between attention and expert devices.

  Dispatch sends each token once to every node holding one of its experts (NVLink fan-out
  inside); combine sums partial outputs inside each expert node and sends one copy to every
  attention node, since each attention device needs the full hidden state. Links are
  full duplex, so dispatch and combine are separate resources.

  Args:
    m: the model.
    hw: the hardware.
    n_attn: attention devices (placed first).
    n_moe: expert devices (placed after them).
    tokens: tokens in the micro-batch.

  Returns:
    {'dispatch': (s, bound), 'combine': (s, bound)}.
  """
  g, row = hw.gpus_per_node, m.d_model * m.act_bytes
  attn_nodes, moe_nodes = {}, {}
  for dev in range(n_attn + n_moe):
    counts = attn_nodes if dev < n_attn else moe_nodes
    counts[dev // g] = counts.get(dev // g, 0) + 1
  experts_per_dev = m.num_experts / n_moe
  egress = {node: [0.0, 0.0] for node in set(attn_nodes) | set(moe_nodes)}  # dispatch, combine
  ingress = {node: [0.0, 0.0] for node in egress}
  for j, devs in moe_nodes.items():
    hit = hit_probability(min(devs * experts_per_dev, m.num_experts), m)
    for a, attn_devs in attn_nodes.items():
      if a == j:
        continue
      sent = tokens * hit * row * attn_devs / n_attn
      egress[a][0] += sent
      ingress[j][0] += sent
      egress[j][1] += tokens * hit * row
      ingress[a][1] += tokens * hit * row
  node_bw = hw.scale_out_bw * g
  out = {}
  for i, name in enumerate(('dispatch', 'combine')):
    t_out = max(max(egress[n][i], ingress[n][i]) for n in egress) / node_bw
    # NVLink: an expert device receives its tokens; an attention device the full hidden state.
    per_gpu = tokens * hit_probability(min(experts_per_dev, m.num_experts), m) if i == 0 else tokens
    t_up = per_gpu * row / hw.scale_up_bw
    latency = hw.scale_out_latency if t_out > 0 else hw.scale_up_latency
    t, bound = _largest({'scale-out': t_out, 'scale-up': t_up})
    out[name] = (t + latency, bound if t > latency else 'latency')
  return out


def pipeline(stages: list[float], microbatches: int, layers: int) -> float:
  """Ping-pong pipeline time of `layers` rounds through `stages` with M micro-batches in flight.

  Throughput-bound (M * T_f >= one round trip): MegaScale-Infer's
  T = (sum of stages) + T_f * (M * L - 1) with T_f the slowest stage. Latency-bound: every layer
  costs a full round trip, the other micro-batches trail by T_f. M = 1 is fully serial.
  """
  slowest, round_trip = max(stages), sum(stages)
  if microbatches * slowest >= round_trip:
    return round_trip + slowest * (microbatches * layers - 1)
  return layers * round_trip + (microbatches - 1) * slowest


# ----------------------------------------------------------------------------------------------
# Calibration: measured kernel timings replace roofline estimates.


@dataclasses.dataclass
class Calibration:
  """Measured figures of one GPU; see the module docstring for the JSON schema."""

  device: str = ''
  figures: dict[str, float] = dataclasses.field(default_factory=dict)
  attention: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  expert_ffn: list[dict[str, Any]] = dataclasses.field(default_factory=list)

  @classmethod
  def load(cls, path: str) -> Calibration:
    with open(path) as f:
      raw = json.load(f)
    kernels = raw.get('kernels', {})
    names = ('matmul_tflops', 'hbm_gbps', 'scale_up_gbps', 'scale_out_gbps')
    figures = {k: float(raw[k]) for k in names if raw.get(k) is not None}
    return cls(
      raw.get('device', ''), figures, kernels.get('attention', []), kernels.get('expert_ffn', [])
    )

  def apply(self, hw: Hardware, dtype: str) -> tuple[Hardware, list[str]]:
    """Returns the hardware with measured rates in place of datasheet peaks, and their names."""
    f, changes = self.figures, {}
    if 'matmul_tflops' in f:
      changes['fp8_flops' if dtype in ('float8', 'fp8') else 'bf16_flops'] = (
        f['matmul_tflops'] * 1e12
      )
    for key, field in (
      ('hbm_gbps', 'hbm_bw'),
      ('scale_up_gbps', 'scale_up_bw'),
      ('scale_out_gbps', 'scale_out_bw'),
    ):
      if key in f:
        changes[field] = f[key] * 1e9
    return dataclasses.replace(hw, **changes), sorted(changes)

  def attention_time(self, m: ModelSpec, mode: str, heads: int, batch: float, seq: int):
    """Measured forward time of one layer's attention on one device, or None."""
    required = {'mode': mode, 'heads': heads, 'seq': seq}
    optional = {'d_model': m.d_model, 'head_dim': m.head_dim}
    return _lookup(self.attention, required, optional, 'batch', batch)

  def expert_time(
    self,
    m: ModelSpec,
    local_experts: float,
    tokens: float,
    hidden: int,
    dropless: bool | None = None,
  ):
    """Measured forward time of one layer's local experts on one device, or None.

    `dropless` is the routing to look up (default: the model's); decode passes True.
    """
    dropless = m.dropless if dropless is None else dropless
    required = {'local_experts': local_experts}
    optional = {'d_model': m.d_model, 'expert_hidden': hidden, 'dropless': dropless}
    return _lookup(self.expert_ffn, required, optional, 'tokens', tokens)


def _lookup(entries, required, optional, axis, x):
  """Exact match on `axis`, else a line through the two nearest entries (through the origin when
  there is one); None if there is none."""
  same = [
    e
    for e in entries
    if all(e.get(k) == v for k, v in required.items())
    and all(e.get(k, v) == v for k, v in optional.items())
  ]
  for e in same:
    if math.isclose(e[axis], x):
      return float(e['time_s'])
  if not same:
    return None
  if len({e[axis] for e in same}) < 2:
    return float(same[0]['time_s']) * x / same[0][axis]
  nearest = sorted(same, key=lambda e: abs(e[axis] - x))
  a = nearest[0]
  b = next(e for e in nearest if e[axis] != a[axis])
  slope = (b['time_s'] - a['time_s']) / (b[axis] - a[axis])
  return max(0.0, a['time_s'] + slope * (x - a[axis]))


# ----------------------------------------------------------------------------------------------
# Predictions.


@dataclasses.dataclass
class Term:
  """Total time of one activity over a step on the busiest device of a role."""

  name: str
  time_s: float
  bound: str
  measured: bool = False


@dataclasses.dataclass
class Prediction:
  """Predicted figures of one strategy and placement."""

  strategy: str
  split: str
  mode: str
  microbatches: int
  step_s: float  # a training step, or one decode step (= TPOT)
  tokens_per_s: float
  mfu: float
  busy: dict[str, float]  # role -> fraction of the step spent in compute kernels
  memory_parts: dict[str, tuple[float, float]]  # role -> bytes per device: (static, dynamic)
  hbm_bytes: float
  terms: list[Term]
  accumulation: int = 1
  notes: list[str] = dataclasses.field(default_factory=list)

  @property
  def memory(self) -> dict[str, float]:
    """Role -> bytes per device. Static: weights (+ grads, Adam); dynamic: activations or KV."""
    return {role: sum(parts) for role, parts in self.memory_parts.items()}

  @property
  def fits(self) -> bool:
    return max(self.memory.values()) <= USABLE_HBM * self.hbm_bytes

  @property
  def bound(self) -> str:
    t = max(self.terms, key=lambda t: t.time_s)
    return f'{t.name}:{t.bound}'

  @property
  def measured(self) -> list[str]:
    return [t.name for t in self.terms if t.measured]


@dataclasses.dataclass(frozen=True)
class Workload:
  """What is run: a training step of the config's batch, or decode of `batch` sequences."""

  mode: str  # 'train' or 'decode'
  batch: int  # sequences
  context: int  # keys per query at decode; sequence length in training
  accumulation: int = 1  # at least this many gradient-accumulation chunks (train.grad_accum_steps)


class _Kernels:
  """Per-device kernel times of one layer: calibration where measured, roofline elsewhere."""

  def __init__(self, m: ModelSpec, hw: Hardware, cal: Calibration | None):
    self.m, self.hw, self.cal = m, hw, cal

  def attention(self, w: Workload, heads: float, seqs: float, weight_reads: float = 1.0):
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
      return measured, 'measured', True
    return (*roofline(flops, nbytes, self.hw, m.compute_dtype), False)

  def experts(self, w: Workload, local: float, pairs: float, routed_tokens: float, hidden: int):
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
      return measured, 'measured', True
    return (*roofline(flops, nbytes, self.hw, m.compute_dtype), False)

  def head(self, w: Workload, seqs: float, vocab_share: float) -> float:
    """Forward unembedding of `seqs` sequences over a share of the vocabulary."""
    m = self.m
    tokens = seqs * (w.context if w.mode == 'train' else 1)
    flops = tokens * 2 * m.d_model * m.vocab_size * vocab_share
    nbytes = m.d_model * m.vocab_size * vocab_share * m.act_bytes
    return roofline(flops, nbytes, self.hw, m.compute_dtype)[0]


def _model_flops(m: ModelSpec, w: Workload) -> float:
  if w.mode == 'train':
    return train_flops_per_token(m) * w.batch * w.context
  return forward_flops_per_token(m, w.context, causal=False) * w.batch


def _finish(m, hw, w, n_devices, step, **kwargs) -> Prediction:
  tokens = w.batch * (w.context if w.mode == 'train' else 1)
  mfu = _model_flops(m, w) / (n_devices * hw.peak_flops(m.compute_dtype) * step)
  return Prediction(
    mode=w.mode, step_s=step, tokens_per_s=tokens / step, mfu=mfu, hbm_bytes=hw.hbm_bytes, **kwargs
  )


def _fit_accumulation(
  m: ModelSpec, hw: Hardware, batch: int, micro: int, memory_fn, minimum: int = 1
):
  """Smallest number (a multiple of `minimum`) of gradient-accumulation chunks whose memory fits
  (the largest if none)."""
  options = [
    a for a in range(minimum, batch + 1, minimum) if batch % a == 0 and (batch // a) % micro == 0
  ]
  for a in options:
    if max(sum(v) for v in memory_fn(batch // a).values()) <= USABLE_HBM * hw.hbm_bytes:
      return a
  return options[-1] if options else 1


# ----------------------------------------------------------------------------------------------
# Strategies.


def _expert_shards(m: ModelSpec, n_moe: int) -> tuple[float, int]:
  """(experts on the busiest device, local hidden width) when experts spread over n_moe devices."""
  if n_moe <= m.num_experts:
    return math.ceil(m.num_experts / n_moe), m.expert_hidden
  return 1, m.expert_hidden * m.num_experts // n_moe  # each expert split along F


def predict_ma_sep(
  m: ModelSpec,
  hw: Hardware,
  w: Workload,
  n_attn: int,
  n_moe: int,
  microbatches: int,
  cal: Calibration | None = None,
) -> Prediction:
  """MA Separation / AFD: heads over n_attn devices, experts over n_moe, M-way ping-pong.

  Every layer of every micro-batch runs attention (+ all-reduce of wo's partial sums over the
  attention devices), dispatch, experts, combine; the four stages pipeline across micro-batches
  (see `pipeline`). Backward runs the same stages with 2 x compute. Embedding and unembedding are
  vocabulary-sharded over the attention devices.
  """
  k, train, b, d = _Kernels(m, hw, cal), w.mode == 'train', m.act_bytes, m.d_model
  slots = math.ceil(m.num_heads / n_attn)
  local, hidden = _expert_shards(m, n_moe)
  per_token_ctx = w.context if train else 1

  def stages(seqs):
    tokens = seqs * per_token_ctx
    attn = k.attention(w, slots, seqs)
    reduce = all_reduce(tokens * d * b, n_attn, hw)
    pairs = tokens * m.top_k * (m.capacity if train else 1.0) * local / m.num_experts
    exp = k.experts(w, local, pairs, tokens, hidden)
    x = afd_exchange(m, hw, n_attn, n_moe, tokens)
    return attn, reduce, exp, x['dispatch'], x['combine']

  attn_p = m.num_layers * (4 * d * m.head_dim * slots + 2 * d + d * m.num_experts)
  attn_p += embed_params(m) / n_attn
  exp_p = m.num_layers * local * m.n_mat * d * hidden

  def memory(chunk_seqs):
    if not train:
      # Generation's program (MASeparation.arena_layout): every device holds its head slots of
      # wq/wk/wv/wo, the norms, router, embedding and head (outside the arena) and one arena
      # sized for the larger of an expert device's experts and an attention device's KV cache,
      # plus one sequence's rows of one layer as scratch. The same bytes on both roles.
      static = m.num_layers * (4 * d * m.head_dim * slots + 2 * d + d * m.num_experts)
      static += embed_params(m)
      kv = w.batch * w.context * 2 * m.head_dim * slots * m.num_layers
      arena = (max(exp_p, kv) + w.context * slots * m.head_dim) * b
      return {'attention': (static * b, arena), 'experts': (static * b, arena)}
    tokens = chunk_seqs * w.context * m.num_layers
    return {
      'attention': (
        attn_p * TRAIN_BYTES_PER_PARAM,
        tokens * attn_act_bytes_per_token(m, slots / m.num_heads),
      ),
      'experts': (
        exp_p * TRAIN_BYTES_PER_PARAM,
        tokens * moe_act_bytes_per_token(m) * local / m.num_experts,
      ),
    }

  accum = _fit_accumulation(m, hw, w.batch, microbatches, memory, w.accumulation) if train else 1
  chunk = w.batch / accum
  attn, reduce, exp, disp, comb = stages(chunk / microbatches)
  fwd = [attn[0] + reduce[0], disp[0], exp[0], comb[0]]
  chunk_s = pipeline(fwd, microbatches, m.num_layers)
  head = k.head(w, chunk, 1 / n_attn)
  if train:
    bwd = [2 * attn[0] + reduce[0], disp[0], 2 * exp[0], comb[0]]
    chunk_s += pipeline(bwd, microbatches, m.num_layers)
    head *= 3
  # Both roles update their own parameters at once; the step waits for the slower.
  opt = optimizer_update(max(attn_p, exp_p), hw) if train else (0.0, 'hbm')
  acc = accumulator_update(max(attn_p, exp_p), accum, hw)
  step = accum * (chunk_s + head) + opt[0] + acc[0]
  passes = 3 if train else 1  # compute multiplier
  comms = 2 if train else 1
  n = accum * microbatches * m.num_layers
  terms = [
    Term('attention', n * passes * attn[0], attn[1], attn[2]),
    Term('attn_allreduce', n * comms * reduce[0], reduce[1]),
    Term('experts', n * passes * exp[0], exp[1], exp[2]),
    Term('dispatch', n * comms * disp[0], disp[1]),
    Term('combine', n * comms * comb[0], comb[1]),
    Term('lm_head', accum * head, 'compute'),
    Term('optimizer', opt[0], opt[1]),
    Term('grad_accumulation', acc[0], acc[1]),
  ]
  busy = {
    'attention': (terms[0].time_s + terms[5].time_s) / step,
    'experts': terms[2].time_s / step,
  }
  notes = []
  if m.num_heads % n_attn:
    notes.append(f'{slots * n_attn - m.num_heads} padded head slots')
  if n_moe <= m.num_experts and m.num_experts % n_moe:
    notes.append(f'{local} experts on the busiest of {n_moe} devices')
  return _finish(
    m,
    hw,
    w,
    n_attn + n_moe,
    step,
    strategy='ma_sep',
    split=f'{n_attn}:{n_moe}',
    microbatches=microbatches,
    busy=busy,
    memory_parts=memory(chunk),
    terms=terms,
    accumulation=accum,
    notes=notes,
  )


def predict_tp_pp(
  m: ModelSpec,
  hw: Hardware,
  w: Workload,
  tp: int,
  pp: int,
  microbatches: int,
  cal: Calibration | None = None,
) -> Prediction:
  """Megatron TP (heads and every expert's F split tp ways, 2 all-reduces per layer forward and
  2 backward) x PP (L / pp layers per stage, 1F1B, bubble (pp - 1) micro-batch slots)."""
  k, train, b, d = _Kernels(m, hw, cal), w.mode == 'train', m.act_bytes, m.d_model
  heads = math.ceil(m.num_heads / tp)
  layers = math.ceil(m.num_layers / pp)
  hidden = math.ceil(m.expert_hidden / tp)
  per_token_ctx = w.context if train else 1
  cross_node = tp * pp > hw.gpus_per_node

  def stage(seqs):
    tokens = seqs * per_token_ctx
    attn = k.attention(w, heads, seqs)
    pairs = tokens * m.top_k * (m.capacity if train else 1.0)
    exp = k.experts(w, m.num_experts, pairs, tokens, hidden)
    reduce = all_reduce(tokens * d * b, tp, hw)
    bw, lat = (
      (hw.scale_out_bw, hw.scale_out_latency)
      if cross_node
      else (hw.scale_up_bw, hw.scale_up_latency)
    )
    p2p = tokens * d * b / tp / bw + lat if pp > 1 else 0.0  # each TP rank sends its slice
    return attn, exp, reduce, p2p, k.head(w, seqs, 1 / tp)

  params = layers * (attn_params_per_layer(m) + moe_params_per_layer(m)) / tp
  params += (2 if pp == 1 else 1) * m.vocab_size * d / tp  # embedding first stage, unembedding last

  def memory(chunk_seqs):
    if not train:
      kv = w.batch * w.context * 2 * m.head_dim * heads * layers * b
      return {'all': (params * b, kv)}
    in_flight = min(pp, microbatches) * chunk_seqs / microbatches * w.context * layers
    act = attn_act_bytes_per_token(m, 1 / tp) + moe_act_bytes_per_token(m) / tp
    return {'all': (params * TRAIN_BYTES_PER_PARAM, in_flight * act)}

  accum = _fit_accumulation(m, hw, w.batch, microbatches, memory, w.accumulation) if train else 1
  acc = accumulator_update(params, accum, hw)
  mb_seqs = w.batch / accum / microbatches
  attn, exp, reduce, p2p, head = stage(mb_seqs)
  fwd = layers * (attn[0] + exp[0] + 2 * reduce[0]) + head + p2p
  if train:
    slots = accum * microbatches + pp - 1
    stage_s = fwd + layers * (2 * attn[0] + 2 * exp[0] + 2 * reduce[0]) + 2 * head + p2p
    opt = optimizer_update(params, hw)
    step, passes, reduces, n_mb = slots * stage_s + opt[0] + acc[0], 3, 4, accum * microbatches
  else:
    opt = (0.0, 'hbm')
    step, passes, reduces, n_mb = max(pp, microbatches) * fwd, 1, 2, microbatches
  n = n_mb * layers
  terms = [
    Term('attention', n * passes * attn[0], attn[1], attn[2]),
    Term('experts', n * passes * exp[0], exp[1], exp[2]),
    Term('tp_allreduce', n * reduces * reduce[0], reduce[1]),
    Term('pp_p2p', n_mb * (2 if train else 1) * p2p, 'scale-out' if cross_node else 'scale-up'),
    Term('lm_head', n_mb * passes * head, 'compute'),
    Term(
      'pp_bubble',
      (step - opt[0] - acc[0]) * (pp - 1) / (n_mb + pp - 1) if train else 0.0,
      'schedule',
    ),
    Term('optimizer', opt[0], opt[1]),
    Term('grad_accumulation', acc[0], acc[1]),
  ]
  busy = {'all': (terms[0].time_s + terms[1].time_s + terms[4].time_s / pp) / step}
  return _finish(
    m,
    hw,
    w,
    tp * pp,
    step,
    strategy='tp_pp',
    split=f'tp{tp}xpp{pp}',
    microbatches=microbatches,
    busy=busy,
    memory_parts=memory(w.batch / accum),
    terms=terms,
    accumulation=accum,
  )


def predict_ep(
  m: ModelSpec, hw: Hardware, w: Workload, n: int, ep: int, cal: Calibration | None = None
) -> Prediction:
  """Data parallel over n devices with experts sharded over groups of ep (ep = 1: plain DP).

  Attention, router and embeddings are replicated; tokens reach their experts by all-to-all
  (dispatch and combine, forward and backward). Gradients of replicated weights are all-reduced
  in fp32, overlapped with the backward pass.
  """
  k, train, b, d = _Kernels(m, hw, cal), w.mode == 'train', m.act_bytes, m.d_model
  local = m.num_experts / ep if m.num_experts % ep == 0 else math.ceil(m.num_experts / ep)
  per_token_ctx = w.context if train else 1
  shared = m.num_layers * (attn_params_per_layer(m) + d * m.num_experts) + embed_params(m)
  experts = m.num_layers * local * expert_params(m)

  def memory(chunk_seqs):
    if not train:
      kv = w.batch / n * w.context * m.num_layers * kv_bytes_per_token_layer(m)
      return {'all': ((shared + experts) * b, kv)}
    act = attn_act_bytes_per_token(m) + moe_act_bytes_per_token(m)
    tokens = chunk_seqs / n * w.context * m.num_layers
    return {'all': ((shared + experts) * TRAIN_BYTES_PER_PARAM, tokens * act)}

  accum = _fit_accumulation(m, hw, w.batch, n, memory, w.accumulation) if train else 1
  acc = accumulator_update(shared + experts, accum, hw)
  seqs = w.batch / accum / n
  tokens = seqs * per_token_ctx
  attn = k.attention(w, m.num_heads, seqs)
  pairs = tokens * m.top_k * (m.capacity if train else 1.0)
  exp = k.experts(w, local, pairs, tokens * ep, m.expert_hidden)
  # Each token goes once to every device of its group that holds one of its experts.
  dests = ep * hit_probability(local, m) if ep > 1 else 0.0
  a2a = all_to_all(tokens * dests * d * b * (ep - 1) / ep, ep, hw)
  head = k.head(w, seqs, 1.0)
  fwd = m.num_layers * (attn[0] + exp[0] + 2 * a2a[0]) + head
  if train:
    bwd = 2 * (fwd - 2 * m.num_layers * a2a[0]) + 2 * m.num_layers * a2a[0]
    sync = all_reduce(shared * GRAD_BYTES, n, hw)[0]
    sync += all_reduce(experts * GRAD_BYTES, n // ep, hw)[0]
    exposed = max(0.0, sync - accum * (bwd - 2 * m.num_layers * a2a[0]))
    opt = optimizer_update(shared + experts, hw)
    step, passes, a2as = accum * (fwd + bwd) + exposed + opt[0] + acc[0], 3, 4
  else:
    step, passes, a2as, sync, exposed, opt = fwd, 1, 2, 0.0, 0.0, (0.0, 'hbm')
  n_l = accum * m.num_layers
  terms = [
    Term('attention', n_l * passes * attn[0], attn[1], attn[2]),
    Term('experts', n_l * passes * exp[0], exp[1], exp[2]),
    Term('all_to_all', n_l * a2as * a2a[0], a2a[1]),
    Term('lm_head', accum * passes * head, 'compute'),
    Term('grad_sync_exposed', exposed, 'scale-out' if n > hw.gpus_per_node else 'scale-up'),
    Term('optimizer', opt[0], opt[1]),
    Term('grad_accumulation', acc[0], acc[1]),
  ]
  busy = {'all': (terms[0].time_s + terms[1].time_s + terms[3].time_s) / step}
  name, split = ('ep', f'ep{ep}xdp{n // ep}') if ep > 1 else ('dp', f'dp{n}')
  return _finish(
    m,
    hw,
    w,
    n,
    step,
    strategy=name,
    split=split,
    microbatches=1,
    busy=busy,
    memory_parts=memory(w.batch / accum),
    terms=terms,
    accumulation=accum,
  )


def _divisors(n: int) -> list[int]:
  return [i for i in range(1, n + 1) if n % i == 0]


def best_ma_sep(m, hw, w, n_attn, n_moe, cal=None, choices=(1, 2, 3, 4, 8)) -> Prediction:
  """The ma_sep prediction with the fastest step over micro-batch counts that divide the batch."""
  options = [c for c in choices if w.batch % c == 0] or [1]
  preds = [predict_ma_sep(m, hw, w, n_attn, n_moe, c, cal) for c in options]
  return min(preds, key=lambda p: (not p.fits, p.step_s))


def plan(
  m: ModelSpec, hw: Hardware, w: Workload, n_devices: int, cal: Calibration | None = None
) -> list[Prediction]:
  """Every strategy and split on n_devices, best first (placements that fit before the rest)."""
  preds = [best_ma_sep(m, hw, w, a, n_devices - a, cal) for a in range(1, n_devices)]
  for tp in _divisors(n_devices):
    pp = n_devices // tp
    if pp <= m.num_layers and m.num_heads % tp == 0:
      options = [c for c in (1, 2, 4, 8) if w.batch % c == 0]
      cands = [predict_tp_pp(m, hw, w, tp, pp, c, cal) for c in options]
      preds.append(min(cands, key=lambda p: (not p.fits, p.step_s)))
  for ep in _divisors(n_devices):
    if ep == 1 or m.num_experts % ep == 0:
      preds.append(predict_ep(m, hw, w, n_devices, ep, cal))
  return sorted(preds, key=lambda p: (not p.fits, p.step_s))


# ----------------------------------------------------------------------------------------------
# AFD communication roofline (arXiv 2602.09721, Sec. 3 and App. A).


def afd_bw_eff(scale_out_bw: float, scale_up_bw: float, top_k: int, n_f_nodes: int) -> float:
  """Eq. 9: inbound bandwidth per FFN rank with two-stage (scale-out, then NVLink) forwarding."""
  return min(scale_out_bw * max(1.0, top_k / n_f_nodes), scale_up_bw)


def afd_hfu_ceiling(
  bw_eff: float,
  ffn_hidden: int,
  peak_flops: float,
  n_mat: int = 3,
  dispatch_bytes: float = 1,
  combine_bytes: float = 2,
) -> float:
  """Eq. 19 generalised: FFN HFU when the link feeds every token the FFN computes.

  A token-expert pair costs 2 * n_mat * H * M FLOPs and H * (dispatch + combine) bytes on the
  link, so HFU = BW_eff * 2 * n_mat * M / (dispatch + combine) / peak, independent of H and of
  the latency budget. SwiGLU with FP8 dispatch and BF16 combine gives the paper's 2 BW M / peak.
  """
  return bw_eff * 2 * n_mat * ffn_hidden / (dispatch_bytes + combine_bytes) / peak_flops


@dataclasses.dataclass(frozen=True)
class AfdSystem:
  """An MoE model on AFD hardware, in the AFD paper's terms (bandwidths in bytes/s)."""

  name: str
  hidden: int  # H
  ffn_hidden: int  # M
  experts: int
  top_k: int
  moe_layers: int
  peak_flops: float
  hbm_bw: float
  scale_out_bw: float
  scale_up_bw: float
  gpus_per_node: int = 8
  n_mat: int = 3
  dispatch_bytes: float = 1
  combine_bytes: float = 2
  weight_bytes: float = 1  # FP8 expert weights


def afd_budget(
  s: AfdSystem, slo_s: float = 0.05, accept: float = 1.7, t_gap: float = 0.015, n_bo: int = 3
) -> float:
  """Eq. 1: per-stage per-micro-batch budget t_B = (SLO * L_accept - t_g) / (layers * N_BO)."""
  return (slo_s * accept - t_gap) / (s.moe_layers * n_bo)


def afd_regime(s: AfdSystem, n_f_nodes: int) -> str:
  """Sec. 3.1: which of the four regimes N_F FFN nodes fall in."""
  if math.ceil(s.experts / (n_f_nodes * s.gpus_per_node)) == 1:
    return 'max intensity'
  if s.top_k / n_f_nodes > s.scale_up_bw / s.scale_out_bw:
    return 'scale-up bound'
  if n_f_nodes >= s.top_k:
    return 'scale-out bound'
  return 'stable intensity'


def afd_roofline(s: AfdSystem, n_f_nodes: int, t_budget: float) -> dict[str, float | str]:
  """HFU bound of the FFN side with N_F nodes: min(link ceiling, HBM roofline at intensity I).

  Eq. 17 B_rank = BW_eff * t_B / bytes per token; Eq. 10 I = 2 B_rank / local experts (per weight
  byte); the GEMMs cannot beat I * HBM bandwidth, nor the link's Eq. 19 ceiling.
  """
  bw = afd_bw_eff(s.scale_out_bw, s.scale_up_bw, s.top_k, n_f_nodes)
  b_rank = bw * t_budget / (s.hidden * (s.dispatch_bytes + s.combine_bytes))
  local = math.ceil(s.experts / (n_f_nodes * s.gpus_per_node))
  intensity = 2 * b_rank / local / s.weight_bytes
  comm = afd_hfu_ceiling(bw, s.ffn_hidden, s.peak_flops, s.n_mat, s.dispatch_bytes, s.combine_bytes)
  mem = intensity * s.hbm_bw / s.peak_flops
  return {
    'regime': afd_regime(s, n_f_nodes),
    'bw_eff': bw,
    'b_rank': b_rank,
    'local_experts': local,
    'intensity': intensity,
    'hfu_comm': comm,
    'hfu_mem': mem,
    'hfu': min(1.0, comm, mem),
  }


def alpha_ep(lam: float, sigma: float) -> float:
  """Eq. 11-12: EP throughput penalty under router skew sigma, lambda = t_a / t_f."""
  return (lam + 1) / (lam + 1 / sigma)


def alpha_afd_exact(sigma: float, n_a: float, n_f: float) -> float:
  """Eq. 13: AFD penalty if attention could shrink to exactly sigma * N_A instances."""
  return sigma * (n_a + n_f) / (sigma * n_a + n_f)


def alpha_afd_discrete(sigma: float, n_a: int, n_f: int) -> float:
  """Eq. 14-16, corrected: whole instances; the better of floor(sigma N_A) and ceil(sigma N_A).

  The printed Eq. 14-15 scale by (lambda_AFD + 1); only (N_A + N_F) / N_A agrees with Eq. 13.
  """
  scale = (n_a + n_f) / n_a
  f, c = math.floor(sigma * n_a), math.ceil(sigma * n_a)
  a_floor = scale * f / (f + n_f)
  a_ceil = scale * c / (c + n_f) * sigma * n_a / c
  return max(a_floor, a_ceil)


def alpha_afd_as_printed(sigma: float, n_a: int, n_f: int) -> float:
  """Eq. 14-16 as printed (factor lambda_AFD + 1): can exceed 1, which is how the typo shows."""
  lam = n_a / n_f
  f, c = math.floor(sigma * n_a), math.ceil(sigma * n_a)
  return max((lam + 1) * f / (f + n_f), (lam + 1) * c / (c + n_f) * sigma * n_a / c)
