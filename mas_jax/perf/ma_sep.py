"""Cost model of `ma_sep` (mas_jax/strategies/ma_separation.py), following its program.

Placement: a (rows, cols) mesh with cols = gcd(A, F); attention devices 0 .. A-1, expert devices
A .. A+F-1. Every device holds ceil(N / A) head slots and E / F expert slots of every layer
(dummy on the other role), the router, norms, embedding and head; AdamW runs over all of it.

With attn_sharding='batch' every device holds all heads (replicated, gradients in the replicated
parameters' psum); an attention device runs all heads of ceil(b / A) sequences of a micro-batch,
and the attention psum becomes an all_gather of every device's [ceil(b / A), T, D] over the mesh
(a reduce_scatter in the backward).

Schedule: the static tick table of `schedule` (the same greedy ping-pong as the code). In a tick
the attention devices run the attention of one (layer, micro-batch) while the expert devices run
the MoE of another; then the tick's exchange runs, after both: a psum of the attention partial
sums over the whole mesh, and the MoE output's way back (with 'replicated' dispatch in the same
psum; with 'all_to_all' dispatch ppermutes from the expert row to each attention row, after the
expert row's own all_to_all and all_gather inside the MoE). A tick costs the slower role plus its
exchange. The backward runs the ticks again in reverse with three times the compute (each tick
recomputes its forward, whatever model.remat says: `ticks_spec`) and the transposed
collectives; its psums also carry the gradient of every implicit broadcast the forward made (see
`collectives`). After the ticks, every device computes
the head and loss of 1/n of the tokens, and the replicated parameters' gradients are all-reduced
over the mesh, once per accumulation chunk.
"""

from __future__ import annotations

import dataclasses
import math

from mas_jax.perf import collectives as coll
from mas_jax.perf.calibration import Calibration
from mas_jax.perf.hardware import Hardware
from mas_jax.perf.kernels import (
  Kernels,
  accumulator_update,
  cast_passes,
  elementwise_passes,
  optimizer_update,
)
from mas_jax.perf.model import (
  ModelSpec,
  attention_block,
  attn_act_bytes_per_token,
  moe_act_bytes_per_token,
)
from mas_jax.perf.prediction import (
  GRAD_BYTES,
  PARAM_BYTES,
  Collective,
  Cost,
  Memory,
  Prediction,
  Term,
  Workload,
  backward_passes,
  finish,
  fit_accumulation,
  optimizer_state_bytes,
  shard_optimizer_memory,
  temporaries,
)


@dataclasses.dataclass(frozen=True)
class Tick:
  """One tick: (layer, micro-batch) of each role, or None where it idles."""

  attn: tuple[int, int] | None
  moe: tuple[int, int] | None


def schedule(num_layers: int, num_microbatches: int) -> list[Tick]:
  """The code's greedy ping-pong (mas_jax.strategies.ma_separation.schedule; a test keeps the two
  equal): attention of (l, m) after the MoE of (l - 1, m) finished in an earlier tick, the MoE
  of (l, m) after its attention."""
  items = [(layer, m) for layer in range(num_layers) for m in range(num_microbatches)]
  attn_done: dict = {}
  moe_done: dict = {}
  ai = ei = 0
  ticks: list[Tick] = []
  while ei < len(items):
    t = len(ticks)
    a = e = None
    if ai < len(items):
      layer, m = items[ai]
      if layer == 0 or moe_done.get((layer - 1, m), t) < t:
        a = items[ai]
    if attn_done.get(items[ei], t) < t:
      e = items[ei]
    if a is not None:
      attn_done[a], ai = t, ai + 1
    if e is not None:
      moe_done[e], ei = t, ei + 1
    ticks.append(Tick(a, e))
  return ticks


@dataclasses.dataclass(frozen=True)
class Split:
  """An attention:expert split as the strategy builds it."""

  n_attn: int
  n_moe: int
  microbatches: int = 1
  dispatch: str = 'auto'  # parallel.moe_dispatch
  hierarchical: bool = False  # parallel.hierarchical_allreduce
  attn_sharding: str = 'heads'  # parallel.attn_sharding: 'heads' or 'batch'

  @property
  def n(self) -> int:
    return self.n_attn + self.n_moe

  @property
  def cols(self) -> int:
    return math.gcd(self.n_attn, self.n_moe)

  @property
  def attn_rows(self) -> int:
    return self.n_attn // self.cols

  @property
  def batch_attn(self) -> bool:
    return self.attn_sharding == 'batch'

  def seq_slots(self, micro_batch: int) -> int:
    """Sequence slots per attention device of a micro-batch (attn_sharding='batch')."""
    return math.ceil(micro_batch / self.n_attn)


def ticks_spec(m: ModelSpec, w: Workload) -> ModelSpec:
  """The spec a training tick runs under: its backward recomputes the role's forward whatever
  model.remat says (MASeparation keeps each tick's inputs, not its branch residuals, which a
  conditional would save as the union of all branches', weights included: see
  `_switch_into_sinks`)."""
  return dataclasses.replace(m, remat='full') if w.train else m


def invalid(m: ModelSpec, s: Split, batch: int, seq_len: int) -> str | None:
  """Why the strategy would refuse this split (its ConfigError), or None."""
  if s.n_attn < 1 or s.n_moe < 1:
    return 'both roles need a device'
  if m.num_experts % s.n_moe:
    return f'num_experts={m.num_experts} does not divide over moe_devices={s.n_moe}'
  if batch % s.microbatches:
    return f'batch {batch} does not divide into {s.microbatches} micro-batches'
  if (batch * seq_len) % s.n:
    return f'{batch * seq_len} tokens do not divide over {s.n} devices'
  if s.dispatch == 'all_to_all' and resolve_dispatch(s, batch) != 'all_to_all':
    return 'all_to_all dispatch needs one expert row and micro-batches that divide over it'
  if s.batch_attn and s.hierarchical:
    return 'hierarchical_allreduce reduces head partial sums; attn_sharding=batch gathers'
  return None


def resolve_dispatch(s: Split, batch: int) -> str:
  """The code's `_resolve_dispatch`: all_to_all with one expert row and whole sequences."""
  fits = s.n_moe == s.cols and (batch // s.microbatches) % s.n_moe == 0
  if s.dispatch == 'auto':
    return 'all_to_all' if fits else 'replicated'
  return s.dispatch


def head_slots(m: ModelSpec, s: Split) -> int:
  """Heads one attention device holds (padding slots included; all of them with 'batch')."""
  return m.num_heads if s.batch_attn else math.ceil(m.num_heads / s.n_attn)


def slots_h(m: ModelSpec, s: Split) -> int:
  """Head slots x head_dim of one attention device."""
  return head_slots(m, s) * m.head_dim


def held_params(m: ModelSpec, s: Split) -> dict[str, float]:
  """Parameters per device as held (every device the same) and as used by each role."""
  local = m.num_experts // s.n_moe
  d, hd, L = m.d_model, m.head_dim, m.num_layers
  heads = L * 4 * d * head_slots(m, s) * hd  # the busiest device's are all real
  experts = L * local * m.n_mat * d * m.expert_hidden
  router = L * d * m.num_experts
  norm = L * d  # one of the two norms of a block
  shared = 2 * m.vocab_size * d + d  # embedding, head, final norm
  return {
    'held': heads + experts + router + 2 * norm + shared,
    'attention': heads + norm + shared,
    'experts': experts + router + norm + shared,
    # With attn_sharding='batch' every device holds the attention weights whole.
    'replicated': router + 2 * norm + shared + (heads if s.batch_attn else 0),
  }


def collectives(m: ModelSpec, hw: Hardware, w: Workload, s: Split, accum: int) -> list[Collective]:
  """The collectives of one step, as the compiled program runs them (kind, group, bytes)."""
  chunk = w.batch // accum
  b = chunk // s.microbatches
  tokens = w.context if w.train else 1
  x = b * tokens * m.d_model * m.act_bytes  # one micro-batch's [b, T, D]
  dispatch = resolve_dispatch(s, chunk)
  ticks = schedule(m.num_layers, s.microbatches)
  items = m.num_layers * s.microbatches
  everyone = list(range(s.n))
  rows = [coll.strided(r * s.cols, s.cols, 1) for r in range(s.n // s.cols)]
  column = coll.strided(0, s.n // s.cols, s.cols)
  out: list[Collective] = []

  def psum(name, nbytes, count):
    if s.hierarchical:  # inside each row (EXPERT_AXIS), then across rows (ATTN_AXIS)
      out.append(coll.collective(name, 'all-reduce', rows[0], nbytes, count, hw))
      out.append(coll.collective(name, 'all-reduce', column, nbytes, count, hw))
    else:
      out.append(coll.collective(name, 'all-reduce', everyone, nbytes, count, hw))

  passes = 2 if w.train else 1
  # A training tick's backward runs the MoE branch's forward again (`ticks_spec`): its two
  # all_to_alls (not the final all_gather, whose output the backward does not need).
  a2a_passes = passes + (1 if w.train else 0)
  if s.batch_attn:
    # Each attention device's outputs of its sequence slots [s, T, D], gathered over the mesh
    # (expert devices send zeros); the backward reduce-scatters their cotangents.
    slots_x = s.seq_slots(b) * tokens * m.d_model * m.act_bytes
    gathered = items * s.n * slots_x
    out.append(
      coll.collective('attention all_gather (forward)', 'all-gather', everyone, gathered, items, hw)
    )
    if w.train:
      scattered = items * slots_x
      out.append(
        coll.collective(
          'attention reduce_scatter (backward)', 'reduce-scatter', everyone, scattered, items, hw
        )
      )
  if dispatch == 'replicated' and s.batch_attn:
    psum('MoE output psum (forward)', items * x, items)
  elif dispatch == 'replicated':
    # Every tick psums [2, b, T, D]: attention partials and the experts' partial outputs.
    psum('tick exchange psum (forward)', len(ticks) * 2 * x, len(ticks))
  elif not s.batch_attn:
    psum('attention psum (forward)', items * x, items)
  if dispatch != 'replicated':
    expert_row = list(range(s.n_attn, s.n))
    cap = m.capacity_slots(tokens) if w.train else tokens  # generation is always dropless
    buf = (b // s.n_moe) * m.num_experts * cap * m.d_model * m.act_bytes
    a2a = coll.collective('dispatch+combine all_to_all', 'all-to-all', expert_row, 0, 1, hw)
    out.append(
      dataclasses.replace(a2a, bytes=a2a_passes * 2 * items * buf, count=a2a_passes * 2 * items)
    )
    out.append(
      coll.collective('MoE output all_gather', 'all-gather', expert_row, items * x, items, hw)
    )
    pairs = [(s.n_attn + c, r * s.cols + c) for r in range(s.attn_rows) for c in range(s.cols)]
    out.append(
      coll.collective(
        'MoE output ppermute to the attention rows',
        'collective-permute',
        [],
        passes * items * x * s.attn_rows,
        passes * items * s.attn_rows,
        hw,
        pairs=pairs[: s.cols],
      )
    )
    if w.train:
      out.append(
        coll.collective(
          'MoE output reduce_scatter (backward)',
          'reduce-scatter',
          expert_row,
          items * x / s.n_moe,
          items,
          hw,
        )
      )
  if not w.train and s.n > 1:
    # Generation returns device 0's logits [B, V] (float32) to every device: XLA reshards them
    # as one 1/n block from device 0 to each other device.
    block = w.batch * m.vocab_size * 4 / s.n
    out.append(
      coll.collective(
        'logits from device 0',
        'collective-permute',
        [],
        (s.n - 1) * block,
        s.n - 1,
        hw,
        pairs=[(0, s.n - 1)],
      )
    )
  if w.train:
    # Backward psums: the transposes of the forward's implicit broadcasts (the psum results
    # added to the varying residual stream, and the embedding output entering each micro-batch;
    # an all_gather's output is varying already: its transpose is the reduce_scatter above).
    attn_psums = 0 if s.batch_attn else items
    back = attn_psums + s.microbatches + (items if dispatch == 'replicated' else 0)
    out.append(
      coll.collective(
        'residual-gradient psum (backward)', 'all-reduce', everyone, back * x, back, hw
      )
    )
    grads = held_params(m, s)['replicated'] - m.vocab_size * m.d_model  # the embedding needs none
    out.append(
      coll.collective(
        'replicated-parameter gradient psum', 'all-reduce', everyone, grads * GRAD_BYTES, 1, hw
      )
    )
  return [dataclasses.replace(c, bytes=c.bytes * accum, count=c.count * accum) for c in out]


def _memory(m: ModelSpec, w: Workload, s: Split, accum: int) -> dict[str, Memory]:
  """Per device (every device holds the same buffers; `used` differs by role)."""
  p = held_params(m, s)
  slots = head_slots(m, s)
  local = m.num_experts // s.n_moe
  micro = w.batch // accum // s.microbatches
  # Sequences per attention device and their share of a micro-batch's (1 with heads).
  share = s.seq_slots(micro) / micro if s.batch_attn else 1.0
  if not w.train:
    # Generation (MASeparation.arena_layout): the head slots, norms, router, embedding and head
    # outside the arena; one arena per device sized for the larger of the experts and the KV
    # cache (of the whole batch, or with 'batch' the device's sequence slots), plus one
    # sequence's rows of one layer as scratch.
    experts = m.num_layers * local * m.n_mat * m.d_model * m.expert_hidden
    static = (p['held'] - experts) * m.act_bytes
    kv = w.batch * share * w.context * 2 * m.head_dim * slots * m.num_layers
    arena = (max(experts, kv) + w.context * slots * m.head_dim) * m.act_bytes
    mem = Memory(params=static, activations=arena)
    return {'attention': mem, 'experts': mem}
  # Every device holds each micro-batch's two residual streams, and per (layer, micro-batch)
  # item what the tick keeps for the backward: its two inputs (`ticks_spec`). Each layer's
  # weights are sliced once (an fp32 copy of the block parameters).
  chunk_tokens = w.batch // accum * w.context
  mb_tokens = chunk_tokens / s.microbatches
  items = m.num_layers * s.microbatches
  scores = slots * attention_block(m.seq_len) * 4 if m.attention_scores else 0.0
  per_token = (attn_act_bytes_per_token(m, slots / m.num_heads) + scores) * share
  per_token += moe_act_bytes_per_token(m) * local / m.num_experts
  row = m.d_model * m.act_bytes
  item = 2 * row
  shared = 2 * m.vocab_size * m.d_model + m.d_model
  saved = mb_tokens * (2 * s.microbatches * row + items * item)
  saved += (p['held'] - shared) * PARAM_BYTES
  mem = temporaries(
    ticks_spec(m, w), p['held'], accum, saved, mb_tokens * per_token, chunk_tokens / s.n
  )
  memory = {
    role: Memory(**{**mem, 'used': p[role] * (PARAM_BYTES + optimizer_state_bytes(m))})
    for role in ('attention', 'experts')
  }
  return shard_optimizer_memory(m, w, s.n, accum, p['held'], memory)


def predict(
  m: ModelSpec, hw: Hardware, w: Workload, s: Split, cal: Calibration | None = None
) -> Prediction:
  """Step time, memory and collectives of ma_sep at split `s` (see the module docstring)."""
  m = m.on_capacity_buffers()
  reason = invalid(m, s, w.batch // max(1, w.accumulation), m.seq_len)
  if reason:
    raise ValueError(f'ma_sep {s.n_attn}:{s.n_moe}: {reason}')
  k = Kernels(m, hw, cal)
  accum = fit_accumulation(hw, w, s.microbatches * s.n, lambda a: _memory(m, w, s, a))
  chunk = w.batch // accum
  b = chunk // s.microbatches
  tokens = w.context if w.train else 1
  local = m.num_experts // s.n_moe
  dispatch = resolve_dispatch(s, chunk)
  # One attention device's work: its head slots of the micro-batch, or all heads of its
  # sequence slots.
  attn = k.attention(w, head_slots(m, s), s.seq_slots(b) if s.batch_attn else b)
  pairs = b * tokens * m.top_k * (m.capacity if w.train else 1.0) * local / m.num_experts
  if m.dropless or not w.train:  # computed rows follow the load: the busiest device's
    pairs *= m.imbalance(s.n_moe)
  exp = k.experts(w, local, pairs, b * tokens, m.expert_hidden)
  colls = collectives(m, hw, w, s, accum)
  times = {c.name: coll.time(c, hw) for c in colls}
  in_branch = (
    'dispatch+combine all_to_all',
    'MoE output all_gather',
    'MoE output reduce_scatter (backward)',
  )
  items = m.num_layers * s.microbatches * accum
  # Per item: the expert row's collectives inside the MoE branch (forward, backward).
  a2a_passes = 3 if w.train else 1  # see `collectives`
  a2a = times.get('dispatch+combine all_to_all', Cost(0.0, 'none')).time_s / items / a2a_passes
  gather = times.get('MoE output all_gather', Cost(0.0, 'none')).time_s / items
  scatter = times.get('MoE output reduce_scatter (backward)', Cost(0.0, 'none')).time_s / items
  bwd = backward_passes(ticks_spec(m, w))  # of a tick
  # Elementwise traffic and weight casts per item (kernels.py), inside each role's branch: the
  # attention side's norm and residual adds; the expert side's dispatch, combine and dropout of
  # the tokens it routes (its 1/F of the micro-batch with all_to_all, all of it replicated). Each
  # item casts its layer's fp32 weights (a calibrated attention kernel was timed with its casts).
  routed_tokens = b * tokens / (s.n_moe if dispatch == 'all_to_all' else 1)
  routed = routed_tokens * m.top_k
  buffers = routed_tokens / tokens * m.num_experts * m.capacity_slots(tokens)
  if dispatch == 'replicated':
    buffers *= local / m.num_experts
  slots = routed if (m.dropless or not w.train) else buffers
  dropout = m.expert_dropout if w.train else 0.0
  a_elem = k.layer_elementwise(w, b).time_s
  e_elem = k.moe_elementwise(w, routed_tokens, routed, slots, m.expert_hidden, dropout).time_s
  a_cast = 0.0 if attn.measured else k.weight_casts(4 * m.d_model * slots_h(m, s)).time_s
  e_cast = k.weight_casts(local * m.n_mat * m.d_model * m.expert_hidden + m.d_model * m.num_experts)
  e_cast = e_cast.time_s if w.train else 0.0
  a_cast = a_cast if w.train else 0.0
  back_elem = elementwise_passes(ticks_spec(m, w), w) - 1.0  # backward, recomputed forward
  back_cast = cast_passes(ticks_spec(m, w), w) - 1.0 if w.train else 0.0
  ticks = schedule(m.num_layers, s.microbatches)
  fwd_s = sum(
    max(
      attn.time_s + a_elem + a_cast if t.attn else 0.0,
      exp.time_s + a2a + gather + e_elem + e_cast if t.moe else 0.0,
    )
    for t in ticks
  )
  bwd_s = 0.0
  if w.train:
    bwd_s = sum(
      max(
        bwd * attn.time_s + back_elem * a_elem + back_cast * a_cast if t.attn else 0.0,
        bwd * exp.time_s
        + (a2a_passes - 1) * a2a
        + scatter
        + back_elem * e_elem
        + back_cast * e_cast
        if t.moe
        else 0.0,
      )
      for t in ticks
    )
  # The head: training splits the tokens over all devices; generation runs every token's head
  # on every device.
  head = k.head(w, chunk / s.n if w.train else w.batch, 1.0)
  head_s = head.time_s * (1 + backward_passes(m) if w.train else 1)
  head_s += k.head_elementwise(w, chunk / s.n if w.train else w.batch).time_s
  if w.train:
    head_s += k.weight_casts(m.d_model * m.vocab_size).time_s
  exchange = sum(t.time_s for name, t in times.items() if name not in in_branch)
  p = held_params(m, s)
  opt = optimizer_update(p['held'], hw, m) if w.train else Cost(0.0, 'hbm')
  acc = accumulator_update(p['held'], accum, hw)
  step = accum * (fwd_s + bwd_s + head_s) + exchange + opt.time_s + acc.time_s
  passes = 1 + bwd if w.train else 1
  terms = [
    Term('attention', items * passes * attn.time_s, attn.bound, attn.measured),
    Term('experts', items * passes * exp.time_s, exp.bound, exp.measured),
    Term(
      'expert-row collectives', sum(times[n].time_s for n in in_branch if n in times), 'scale-up'
    ),
    Term(
      'idle (waiting for the other role)',
      accum * (fwd_s + bwd_s) - items * passes * max(attn.time_s, exp.time_s),
      'schedule',
    ),
    Term(
      'exchange and gradient collectives',
      exchange,
      max(times.values(), key=lambda t: t.time_s).bound if times else 'none',
    ),
    Term('lm_head (with its norm, loss and cast)', accum * head_s, head.bound),
    Term(
      'elementwise and casts (in the ticks)',
      items * ((1 + back_elem) * (a_elem + e_elem) + (1 + back_cast) * (a_cast + e_cast)),
      'hbm',
    ),
    Term('optimizer', opt.time_s, opt.bound),
    Term('grad_accumulation', acc.time_s, acc.bound),
  ]
  busy = {
    'attention': (items * passes * attn.time_s + accum * head_s) / step,
    'experts': (items * passes * exp.time_s + accum * head_s) / step,
  }
  notes = []
  if s.batch_attn and b % s.n_attn:
    notes.append(f'{s.seq_slots(b) * s.n_attn - b} padded sequence slots per micro-batch')
  elif not s.batch_attn and m.num_heads % s.n_attn:
    notes.append(f'{head_slots(m, s) * s.n_attn - m.num_heads} padded head slots')
  return finish(
    m,
    hw,
    w,
    s.n,
    step,
    strategy='ma_sep',
    split=f'{s.n_attn}:{s.n_moe}',
    microbatches=s.microbatches,
    busy=busy,
    memory_by_role=_memory(m, w, s, accum),
    terms=terms,
    accumulation=accum,
    notes=notes + [f'moe_dispatch={dispatch}', f'attn_sharding={s.attn_sharding}'],
    collectives=colls,
  )
