"""What a prediction is: named costs, the workload, memory per role, the result of one placement."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from mas_jax.perf.hardware import USABLE_HBM, Hardware
from mas_jax.perf.model import (
  ModelSpec,
  forward_flops_per_token,
  total_params,
  train_flops_per_token,
)

# Bytes per parameter held in training: fp32 weight and two fp32 AdamW moments (the optimizer
# state follows its parameter's sharding; `optimizer_state_bytes` with train.mu_dtype), and the
# fp32 gradient.
PARAM_BYTES = 4
OPTIMIZER_STATE_BYTES = 8
GRAD_BYTES = 4
# HBM traffic of the optimizer update per parameter held: AdamW reads fp32 param, grad, m, v and
# writes param, m, v (7 x 4 B); clip_by_global_norm reads the gradient once more for its norm.
# A bfloat16 first moment (train.mu_dtype) reads and writes 2 B fewer each.
ADAMW_BYTES_PER_PARAM = 28
CLIP_BYTES_PER_PARAM = 4
OPTIMIZER_BYTES_PER_PARAM = ADAMW_BYTES_PER_PARAM + CLIP_BYTES_PER_PARAM


def optimizer_state_bytes(m: ModelSpec) -> int:
  """Bytes of AdamW's moments per parameter: the first in train.mu_dtype, the second fp32."""
  return OPTIMIZER_STATE_BYTES - (4 - m.mu_bytes)


def optimizer_bytes_per_param(m: ModelSpec) -> int:
  """HBM bytes of the optimizer update per parameter held (OPTIMIZER_BYTES_PER_PARAM with
  train.mu_dtype's first moment)."""
  return OPTIMIZER_BYTES_PER_PARAM - 2 * (4 - m.mu_bytes)


# Gradient accumulation (train.grad_accum_steps > 1): every chunk reads the fp32 accumulator and
# the chunk's fp32 gradient and writes the accumulator.
ACCUMULATOR_BYTES_PER_PARAM = 12
# With train.fuse_grad_accum the expert weight-gradient GEMMs add into the accumulator (beta = 1)
# and no separate pass runs: the GEMM epilogue reads and writes the accumulator in fp32 instead of
# writing a bf16 gradient (4 + 4 - 2 = 6 B), where the pass moved 2 + 4 + 4 = 10 B (counted as 12
# above): 4 B fewer, so 12 - 4 in this count. One H100's train step (docs/benchmarks/
# grad_accum_call/: 4 chunks, 2.15e9 expert parameters) saved 18.3 ms, more than the 10.3 ms these
# 4 B predict at the datasheet's 3.35 TB/s: the count is a lower bound on the saving.
FUSED_ACCUMULATOR_BYTES_PER_PARAM = 8


class Cost(NamedTuple):
  """Time of one kernel or collective and the resource that bounds it."""

  time_s: float
  bound: str  # compute, hbm, scale-up, scale-out, latency, schedule, none
  measured: bool = False  # taken from a calibration file


@dataclasses.dataclass
class Term:
  """Total time of one activity over a step on the busiest device of a role."""

  name: str
  time_s: float
  bound: str
  measured: bool = False


@dataclasses.dataclass(frozen=True)
class Memory:
  """Bytes one device of a role holds (dummy slots included) and the bytes its role reads."""

  params: float  # parameters as held: fp32 in training, compute dtype in decode
  optimizer: float = 0.0  # AdamW moments
  grads: float = 0.0  # gradients (and the accumulator with accumulation)
  activations: float = 0.0  # saved activations (training) or KV cache (decode)
  used: float | None = None  # params + optimizer bytes the role reads (None: all of them)

  @property
  def state(self) -> float:
    """Parameters and optimizer state: what `Strategy.memory_rows` reports as held."""
    return self.params + self.optimizer

  @property
  def total(self) -> float:
    return self.params + self.optimizer + self.grads + self.activations

  @property
  def efficiency(self) -> float:
    """Used / held of parameters and optimizer state."""
    return 1.0 if self.used is None or not self.state else self.used / self.state


@dataclasses.dataclass(frozen=True)
class Collective:
  """Collectives of one kind over groups of `group` devices, per step, as the code runs them.

  `bytes` follows mas_jax.perf.hlo's convention (the result on one device, summed over the
  step) so that the planner's list compares with the compiled program's.
  """

  name: str  # what it carries, e.g. 'attention psum (forward)'
  kind: str  # all-reduce, all-to-all, collective-permute, all-gather, reduce-scatter
  group: int  # devices per group (collective-permute: source-target pairs)
  bytes: float  # per device, summed over the step
  count: int = 1  # ops per step before XLA's combiners merge them
  local: int = 1  # group members on the busiest node (time model only)
  nodes: int = 1  # nodes the group spans (time model only)


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
  memory_by_role: dict[str, Memory]  # role -> bytes per device
  hbm_bytes: float
  terms: list[Term]
  accumulation: int = 1
  notes: list[str] = dataclasses.field(default_factory=list)
  collectives: list[Collective] = dataclasses.field(default_factory=list)

  @property
  def memory(self) -> dict[str, float]:
    """Role -> bytes per device."""
    return {role: m.total for role, m in self.memory_by_role.items()}

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

  def time(self, *names: str) -> float:
    """Summed time of the named terms (absent names count zero)."""
    return sum(t.time_s for t in self.terms if t.name in names)


@dataclasses.dataclass(frozen=True)
class Workload:
  """What is run: a training step of the config's batch, or decode of `batch` sequences."""

  mode: str  # 'train' or 'decode'
  batch: int  # sequences
  context: int  # keys per query at decode; sequence length in training
  accumulation: int = 1  # at least this many gradient-accumulation chunks (train.grad_accum_steps)
  # False: exactly `accumulation` chunks, the program as configured (validation, fidelity);
  # True: the planner may raise it until the memory fits.
  fit_memory: bool = True
  # parallel.shard_optimizer (mas_jax/zero.py): master weights and moments split over all devices.
  shard_optimizer: bool = False
  shard_gradients: bool = True  # parallel.shard_gradients (with shard_optimizer)
  fuse_grad_accum: bool = False  # train.fuse_grad_accum (one device, one layer, accumulation)

  @property
  def train(self) -> bool:
    return self.mode == 'train'


def model_flops(m: ModelSpec, w: Workload) -> float:
  """Model FLOPs of the workload (the MFU convention of mas_jax.perf.model)."""
  if w.train:
    return train_flops_per_token(m) * w.batch * w.context
  return forward_flops_per_token(m, w.context, causal=False) * w.batch


def finish(m: ModelSpec, hw: Hardware, w: Workload, n_devices: int, step: float, **kwargs):
  """A Prediction with throughput and MFU filled in."""
  tokens = w.batch * (w.context if w.train else 1)
  mfu = model_flops(m, w) / (n_devices * hw.peak_flops(m.compute_dtype) * step)
  return Prediction(
    mode=w.mode, step_s=step, tokens_per_s=tokens / step, mfu=mfu, hbm_bytes=hw.hbm_bytes, **kwargs
  )


def fit_accumulation(hw: Hardware, w: Workload, granule: int, memory_fn) -> int:
  """Accumulation chunks: the smallest multiple of w.accumulation whose memory fits (the largest
  if none does); each chunk must divide into `granule` sequences. Decode: 1."""
  if not w.train:
    return 1
  if not w.fit_memory:
    return w.accumulation
  options = [
    a
    for a in range(w.accumulation, w.batch + 1, w.accumulation)
    if w.batch % a == 0 and (w.batch // a) % granule == 0
  ]
  for a in options:
    if max(mem.total for mem in memory_fn(a).values()) <= USABLE_HBM * hw.hbm_bytes:
      return a
  return options[-1] if options else w.accumulation


def train_state(
  params: float, accum: int, used: float | None = None, state_bytes: int = OPTIMIZER_STATE_BYTES
) -> dict:
  """Memory fields of `params` fp32 parameters in training: moments (`state_bytes` per
  parameter), gradients (and the accumulator with accumulation)."""
  return {
    'params': params * PARAM_BYTES,
    'optimizer': params * state_bytes,
    'grads': params * GRAD_BYTES * (2 if accum > 1 else 1),
    'used': None if used is None else used * (PARAM_BYTES + state_bytes),
  }


def temporaries(
  m: ModelSpec, held: float, accum: int, saved: float, layer: float, logits_tokens: float
) -> dict:
  """Memory fields of a training step's peak on one device: the larger of two phases.

  Backward: the gradients (and the accumulator), the activations saved by the forward (`saved`
  bytes), one layer's activations (`layer` bytes) twice over while its backward runs (once more
  recomputed under remat='full', already in `saved` otherwise), and the float32 logits and their
  gradient of `logits_tokens` tokens. Update: the gradients and AdamW's update, both float32 and
  parameter-sized. Checked against the compiled programs' memory analysis by bench/planner_memory.py
  and tests/test_perf_fidelity.py."""
  state = train_state(held, accum, state_bytes=optimizer_state_bytes(m))
  backward = state['grads'] + saved + (2 * layer if m.remat == 'full' else 0.0)
  backward += 2 * logits_tokens * m.vocab_size * 4
  update = 2 * held * GRAD_BYTES
  return {**state, 'activations': max(backward, update) - state['grads']}


def shard_optimizer_memory(
  m: ModelSpec, w: Workload, n: int, accum: int, held: float, memory: dict[str, Memory]
) -> dict[str, Memory]:
  """`memory` (a role's buffers as held without optimizer sharding, `held` parameters per
  device in the strategy's layout) with parallel.shard_optimizer: each device holds 1/n of the
  fp32 master weights and both moments (all of it updated: efficiency 1), a float32 gradient
  accumulator of the same 1/n (with accumulation; of `held` with shard_gradients=False), one
  chunk's gradients with respect to the
  compute copy, and the compute copy itself (`held` parameters in the compute dtype, dummy
  slots included). The saved activations are unchanged. Checked against the GPU compile by
  bench/memory.py (docs/benchmarks/memory.json)."""
  if not (w.shard_optimizer and w.train):
    return memory
  shard = total_params(m) / n
  copy = held * m.act_bytes
  # The float32 accumulator: the master's 1/n (shard_gradients, ZeRO-2), else the compute
  # layout's (ZeRO-1).
  accum_grads = (shard if w.shard_gradients else held) * GRAD_BYTES if accum > 1 else 0.0
  out = {}
  for role, mem in memory.items():
    out[role] = Memory(
      params=shard * PARAM_BYTES,
      optimizer=shard * optimizer_state_bytes(m),
      grads=accum_grads + copy,
      activations=mem.activations + copy,
    )
  return out


def saved_per_token_layer(m: ModelSpec, layer: float) -> float:
  """Bytes a layer's forward keeps per token until its backward: its input under remat='full'
  (the block is recomputed), else everything (`layer`)."""
  return m.d_model * m.act_bytes if m.remat == 'full' else layer


def backward_passes(m: ModelSpec) -> float:
  """Backward compute in forward passes: 2, plus the recomputed forward under remat='full'."""
  return 3.0 if m.remat == 'full' else 2.0
