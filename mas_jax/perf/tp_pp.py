"""Cost model of `tp_pp` (mas_jax/strategies/tp_pp.py), following its program.

Mesh (pipe, tensor) = (pp, tp), stage s on devices s*tp .. s*tp+tp-1. A stage holds L/pp layers
with heads and every expert's F split tp ways; the router, norms, embedding and head are
replicated on every device. GPipe: M + pp - 1 ticks forward and as many backward; in a tick every
stage runs its layers (on zeros outside its micro-batches: the bubble costs the same time as
work) and ppermutes its output to the next stage. Per layer and tick: the attention output and
the MoE output are psum-ed over 'tensor' (forward); the backward psums the input gradients of
q, k and v separately, of the expert capacity buffer and of the gates. The head runs on the last
stage after the pipeline. Over 'pipe' the backward psums stage 0's input gradient in every tick
(every stage looks the input up) and the head's gradients.

1F1B (parallel.pp_schedule='1f1b', training): 2 (M + pp - 1) ticks of one forward or one
backward per stage (a per-stage cond), the backward recomputing the stage's forward from its
saved input; pp ticks run forwards only, the other ticks take as long as a backward (the ticks
are joined by the ppermutes). Every tick ppermutes outputs to s + 1 and input gradients to s - 1.
The compiled program holds both branches in every tick, and the HLO reader counts every branch
once per tick: `collectives` lists them so (what the fidelity test compares), while the time
model counts the branches a device runs (M backwards, the other ticks forwards). Over 'pipe' one
psum of the embedding's and the head's gradients. A stage holds pp micro-batches' inputs and one
micro-batch's backward; the head's logits cover one micro-batch.
"""

from __future__ import annotations

import dataclasses

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
from mas_jax.perf.model import ModelSpec, layer_act_bytes_per_token
from mas_jax.perf.prediction import (
  GRAD_BYTES,
  Collective,
  Cost,
  Memory,
  Prediction,
  Term,
  Workload,
  backward_passes,
  finish,
  fit_accumulation,
  saved_per_token_layer,
  shard_optimizer_memory,
  temporaries,
)


def invalid(m: ModelSpec, tp: int, pp: int, microbatches: int, batch: int) -> str | None:
  """Why the strategy would refuse this shape (its ConfigError), or None."""
  if m.num_heads % tp:
    return f'num_heads={m.num_heads} is not divisible by tp={tp}'
  if m.expert_hidden % tp:
    return f'expert_hidden={m.expert_hidden} is not divisible by tp={tp}'
  if m.num_layers % pp:
    return f'num_layers={m.num_layers} is not divisible by pp={pp}'
  if batch % microbatches:
    return f'batch {batch} does not divide into {microbatches} micro-batches'
  return None


def held_params(m: ModelSpec, tp: int, pp: int) -> float:
  """Parameters per device (every device the same)."""
  d, lps = m.d_model, m.num_layers // pp
  attn = 4 * d * m.num_heads * m.head_dim // tp
  experts = m.num_experts * m.n_mat * d * m.expert_hidden // tp
  return lps * (attn + experts + d * m.num_experts + 2 * d) + 2 * m.vocab_size * d + d


def _forward_only_ticks(pp: int, microbatches: int) -> int:
  """1F1B ticks in which no stage runs a backward (tp_pp.one_f_one_b): the first pp, or every
  other tick with one stage."""
  return pp if pp > 1 else microbatches


def collectives(
  m: ModelSpec,
  hw: Hardware,
  w: Workload,
  tp: int,
  pp: int,
  microbatches: int,
  accum: int,
  schedule: str = 'gpipe',
  as_run: bool = False,
) -> list[Collective]:
  """The collectives of one step, as the compiled program holds them (kind, group, bytes).

  1F1B: `as_run` False counts both branches of every tick (mas_jax.perf.hlo's reading); True
  those a device runs (M backward ticks, the others forward), for the time model.
  """
  if w.train and schedule == '1f1b':
    return _collectives_1f1b(m, hw, w, tp, pp, microbatches, accum, as_run)
  chunk = w.batch // accum
  b = chunk // microbatches
  tokens = w.context if w.train else 1
  a = m.act_bytes
  x = b * tokens * m.d_model * a
  ticks = microbatches + pp - 1
  lps = m.num_layers // pp
  stage = list(range(tp))
  pipe = coll.strided(0, pp, tp)
  out: list[Collective] = []
  if tp > 1:
    n = ticks * lps
    out.append(
      coll.collective('attention + MoE output psum', 'all-reduce', stage, n * 2 * x, 2 * n, hw)
    )
    if w.train and m.remat == 'full':
      # The recomputed forward repeats the attention psum (the MoE psum makes the block's
      # output, which the backward does not need).
      out.append(coll.collective('attention psum (recomputed)', 'all-reduce', stage, n * x, n, hw))
    if w.train:
      cap = m.capacity_slots(tokens)
      buf = b * m.num_experts * cap * m.d_model * a
      gates = b * tokens * m.top_k * a
      out.append(
        coll.collective(
          'q/k/v, expert-buffer and gate input-gradient psums (backward)',
          'all-reduce',
          stage,
          n * (3 * x + buf + gates),
          5 * n,
          hw,
        )
      )
  if pp > 1 and not w.train:
    # Generation: the last stage's logits [B, V] (float32) are psum-ed over 'pipe'.
    out.append(
      coll.collective('logits psum', 'all-reduce', pipe, w.batch * m.vocab_size * 4, 1, hw)
    )
  if pp > 1:
    pairs = [(s * tp + t, (s + 1) * tp + t) for s in range(pp - 1) for t in range(tp)]
    passes = 2 if w.train else 1
    out.append(
      coll.collective(
        'stage output ppermute',
        'collective-permute',
        [],
        passes * ticks * x,
        passes * ticks,
        hw,
        pairs=pairs,
      )
    )
    if w.train:
      # Every tick looks up stage 0's input on every stage (a broadcast over 'pipe' whose
      # transpose is a psum per tick); the head's gradients come from the last stage only.
      grads = (m.vocab_size * m.d_model + m.d_model) * GRAD_BYTES
      out.append(
        coll.collective(
          'stage-input gradient and head gradient psum',
          'all-reduce',
          pipe,
          ticks * x + grads,
          ticks + 1,
          hw,
        )
      )
  return [dataclasses.replace(c, bytes=c.bytes * accum, count=c.count * accum) for c in out]


def _collectives_1f1b(
  m: ModelSpec,
  hw: Hardware,
  w: Workload,
  tp: int,
  pp: int,
  microbatches: int,
  accum: int,
  as_run: bool,
) -> list[Collective]:
  b = w.batch // accum // microbatches
  x = b * w.context * m.d_model * m.act_bytes
  ticks = 2 * (microbatches + pp - 1)
  forward_runs, backward_runs = (ticks - microbatches, microbatches) if as_run else (ticks, ticks)
  lps = m.num_layers // pp
  stage = list(range(tp))
  pipe = coll.strided(0, pp, tp)
  out: list[Collective] = []
  if tp > 1:
    fwd, bwd = forward_runs * lps, backward_runs * lps
    out.append(
      coll.collective('attention + MoE output psum', 'all-reduce', stage, fwd * 2 * x, 2 * fwd, hw)
    )
    buf = b * m.num_experts * m.capacity_slots(w.context) * m.d_model * m.act_bytes
    gates = b * w.context * m.top_k * m.act_bytes
    # The backward's forward (the same two psums), the attention psum again under remat='full',
    # and the input-gradient psums of q, k, v, the expert buffer and the gates.
    again = 3 if m.remat == 'full' else 2
    out.append(
      coll.collective(
        'recomputed forward and input-gradient psums (backward ticks)',
        'all-reduce',
        stage,
        bwd * (again * x + 3 * x + buf + gates),
        bwd * (again + 5),
        hw,
      )
    )
  if pp > 1:
    pairs = [(s * tp + t, (s + 1) * tp + t) for s in range(pp - 1) for t in range(tp)]
    out.append(
      coll.collective(
        'stage output and input-gradient ppermutes',
        'collective-permute',
        [],
        2 * ticks * x,
        2 * ticks,
        hw,
        pairs=pairs,
      )
    )
    # The embedding's gradient (from stage 0) and the head's (from the last stage).
    grads = (2 * m.vocab_size * m.d_model + m.d_model) * GRAD_BYTES
    out.append(
      coll.collective('embedding and head gradient psum', 'all-reduce', pipe, grads, 1, hw)
    )
  return [dataclasses.replace(c, bytes=c.bytes * accum, count=c.count * accum) for c in out]


def _memory(
  m: ModelSpec,
  w: Workload,
  tp: int,
  pp: int,
  microbatches: int,
  accum: int,
  schedule: str = 'gpipe',
):
  held = held_params(m, tp, pp)
  lps = m.num_layers // pp
  if not w.train:
    kv = w.batch * w.context * 2 * m.head_dim * (m.num_heads // tp) * lps * m.act_bytes
    return {'all': Memory(params=held * m.act_bytes, activations=kv)}
  # GPipe: every tick (bubble ticks too, which compute on zeros) keeps its layers' saved
  # activations, the carried stage input and its output until the backward; the head's logits
  # cover the whole chunk on the last stage.
  ticks = microbatches + pp - 1
  chunk_tokens = w.batch // accum * w.context
  mb_tokens = chunk_tokens / microbatches
  per_token = layer_act_bytes_per_token(m, 1 / tp, 1 / tp)
  carried = 2 * m.d_model * m.act_bytes
  if schedule == '1f1b':
    # The ring of pp stage inputs, the carried cotangent and the two ppermutes' buffers, and one
    # micro-batch's backward through the stage (its saved activations); the head on one
    # micro-batch.
    held_inputs = (pp + 3) * mb_tokens * m.d_model * m.act_bytes
    saved = held_inputs + mb_tokens * lps * saved_per_token_layer(m, per_token)
    mem = temporaries(m, held, accum, saved, mb_tokens * per_token, mb_tokens)
  else:
    saved = ticks * mb_tokens * (lps * saved_per_token_layer(m, per_token) + carried)
    mem = temporaries(m, held, accum, saved, mb_tokens * per_token, chunk_tokens)
  return shard_optimizer_memory(m, w, tp * pp, accum, held, {'all': Memory(**mem)})


def predict(
  m: ModelSpec,
  hw: Hardware,
  w: Workload,
  tp: int,
  pp: int,
  microbatches: int,
  cal: Calibration | None = None,
  schedule: str = 'gpipe',
) -> Prediction:
  """Step time, memory and collectives of tp_pp (see the module docstring); `schedule` is
  parallel.pp_schedule (it changes training only)."""
  m = m.on_capacity_buffers()
  reason = invalid(m, tp, pp, microbatches, w.batch)
  if reason:
    raise ValueError(f'tp_pp tp{tp}xpp{pp}: {reason}')
  k = Kernels(m, hw, cal)
  accum = fit_accumulation(
    hw, w, microbatches, lambda a: _memory(m, w, tp, pp, microbatches, a, schedule)
  )
  one_f_one_b = w.train and schedule == '1f1b'
  chunk = w.batch // accum
  b = chunk // microbatches
  tokens = w.context if w.train else 1
  lps = m.num_layers // pp
  attn = k.attention(w, m.num_heads // tp, b)
  pairs = b * tokens * m.top_k * (m.capacity if w.train else 1.0)
  exp = k.experts(w, m.num_experts, pairs, b * tokens, m.expert_hidden // tp)
  colls = collectives(m, hw, w, tp, pp, microbatches, accum, schedule)
  run = collectives(m, hw, w, tp, pp, microbatches, accum, schedule, as_run=True)
  comm = sum(coll.time(c, hw).time_s for c in run)
  ticks = microbatches + pp - 1
  bwd = backward_passes(m) if w.train else 0.0
  # Every tick of every stage computes (on zeros outside its micro-batches).
  compute = accum * ticks * lps * (1 + bwd) * (attn.time_s + exp.time_s)
  # In forward passes per micro-batch and layer: what a tick costs, summed over the ticks.
  tick_passes = ticks * (1 + bwd)
  if one_f_one_b:
    # 2 (M + pp - 1) ticks, each as long as the slowest stage's op: pp ticks of forwards only,
    # the others a backward (the stage's forward once more, then the backward).
    forward_only = _forward_only_ticks(pp, microbatches)
    tick_passes = forward_only + (2 * ticks - forward_only) * (1 + bwd)
    compute = accum * lps * tick_passes * (attn.time_s + exp.time_s)
  head = k.head(w, chunk if w.train else w.batch, 1.0)
  head_s = accum * head.time_s * (1 + bwd)
  held = held_params(m, tp, pp)
  opt = optimizer_update(held, hw, m) if w.train else Cost(0.0, 'hbm')
  acc = accumulator_update(held, accum, hw)
  # Elementwise traffic (kernels.py) per tick and layer: norms, residuals, dispatch and combine
  # run replicated over 'tensor' at full width, the expert dropout on this device's F / tp;
  # the head's norm, gather and loss on the last stage; casts of the stage's matmul weights.
  tokens_mb = b * tokens
  routed = tokens_mb * m.top_k
  capacity_rows = b * m.num_experts * m.capacity_slots(tokens)
  slots = routed if (m.dropless or not w.train) else capacity_rows
  dropout = m.expert_dropout if w.train else 0.0
  per_layer = k.layer_elementwise(w, b).time_s
  hidden = m.expert_hidden // tp
  per_layer += k.moe_elementwise(w, tokens_mb, routed, slots, hidden, dropout).time_s
  elem = accum * ticks * lps * elementwise_passes(m, w) * per_layer
  if one_f_one_b:
    elem *= tick_passes / (ticks * (1 + bwd))
  elem += accum * k.head_elementwise(w, chunk if w.train else w.batch).time_s
  # (Once per forward pass of a chunk, as if XLA hoists them out of the tick loop; a calibrated
  # attention kernel was timed with its casts.)
  block = m.num_experts * m.n_mat * m.d_model * hidden + m.d_model * m.num_experts
  block += 0 if attn.measured else 4 * m.d_model * m.num_heads * m.head_dim // tp
  casts = accum * k.weight_casts(lps * block, cast_passes(m, w)).time_s
  casts += accum * k.weight_casts(m.d_model * m.vocab_size, min(1.0, cast_passes(m, w))).time_s
  step = compute + elem + casts + comm + head_s + opt.time_s + acc.time_s
  useful = accum * microbatches * lps * (1 + bwd) * (attn.time_s + exp.time_s)
  # 1F1B: the forward each backward runs again; pp_bubble is the rest (idle ticks, and forward
  # ticks as long as a neighbour's backward).
  recompute = accum * microbatches * lps * (attn.time_s + exp.time_s) if one_f_one_b else 0.0
  terms = [
    Term('attention', useful * attn.time_s / (attn.time_s + exp.time_s), attn.bound, attn.measured),
    Term('experts', useful * exp.time_s / (attn.time_s + exp.time_s), exp.bound, exp.measured),
    Term('pp_bubble', compute - useful - recompute, 'schedule'),
    Term('pp_recompute', recompute, attn.bound),
    Term(
      'collectives',
      comm,
      max((coll.time(c, hw) for c in run), key=lambda t: t.time_s).bound if run else 'none',
    ),
    Term('lm_head', head_s, head.bound),
    Term('elementwise', elem, 'hbm'),
    Term('weight_casts', casts, 'hbm'),
    Term('optimizer', opt.time_s, opt.bound),
    Term('grad_accumulation', acc.time_s, acc.bound),
  ]
  return finish(
    m,
    hw,
    w,
    tp * pp,
    step,
    strategy='tp_pp',
    split=f'tp{tp}xpp{pp}',
    microbatches=microbatches,
    busy={'all': (useful + head_s / pp) / step},
    memory_by_role=_memory(m, w, tp, pp, microbatches, accum, schedule),
    terms=terms,
    accumulation=accum,
    collectives=colls,
  )
