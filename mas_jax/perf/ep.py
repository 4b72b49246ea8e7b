"""Cost model of `ep` and `dp` (mas_jax/strategies/ep.py, dp.py), following their programs.

ep: mesh (data, expert) = (n / ep, ep); device (d, e) holds every replicated parameter and E/ep
experts of every layer, and its own B/n sequences. Per MoE layer, forward and backward, two
all_to_alls inside each expert group (contiguous devices) carry every expert's capacity buffer to
its device and back. Gradients: the replicated parameters' are all-reduced over all devices, the
experts' over the data groups (devices ep apart), inside each accumulation chunk's backward.
dp is ep = 1: no all_to_all, every gradient all-reduced over all devices.
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
from mas_jax.perf.model import (
  ModelSpec,
  attn_params_per_layer,
  embed_params,
  expert_params,
  kv_bytes_per_token_layer,
  layer_act_bytes_per_token,
)
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


def invalid(m: ModelSpec, n: int, ep: int, batch: int) -> str | None:
  if n % ep:
    return f'ep={ep} does not divide the device count {n}'
  if m.num_experts % ep:
    return f'num_experts={m.num_experts} is not divisible by ep={ep}'
  if batch % n:
    return f'batch {batch} does not divide over {n} devices'
  return None


def held_params(m: ModelSpec, ep: int) -> dict[str, float]:
  shared = m.num_layers * (attn_params_per_layer(m) + m.d_model * m.num_experts)
  shared += embed_params(m)
  experts = m.num_layers * m.num_experts // ep * expert_params(m)
  return {'held': shared + experts, 'shared': shared, 'experts': experts}


def collectives(
  m: ModelSpec, hw: Hardware, w: Workload, n: int, ep: int, accum: int
) -> list[Collective]:
  """The collectives of one step, as the compiled program runs them (kind, group, bytes)."""
  chunk = w.batch // accum
  local = chunk // n  # sequences per device
  tokens = w.context if w.train else 1
  params = held_params(m, ep)
  # Forward, backward, and under remat='full' the forward again (both all_to_alls are
  # recomputed: the combine's backward needs the returned buffer).
  passes = (3 if m.remat == 'full' else 2) if w.train else 1
  out: list[Collective] = []
  if ep > 1:
    cap = m.capacity_slots(tokens) if w.train else tokens  # generation is always dropless
    buf = local * m.num_experts * cap * m.d_model * m.act_bytes
    ops = passes * 2 * m.num_layers
    out.append(
      coll.collective(
        'dispatch+combine all_to_all', 'all-to-all', list(range(ep)), ops * buf, ops, hw
      )
    )
  if w.train:
    out.append(
      coll.collective(
        'replicated-parameter gradient all-reduce',
        'all-reduce',
        list(range(n)),
        params['shared'] * GRAD_BYTES,
        1,
        hw,
      )
    )
    if n // ep > 1:
      group = coll.strided(0, n // ep, ep)
      nbytes = params['experts'] * GRAD_BYTES
      if ep == 1:  # dp: one all-reduce of everything
        out[-1] = coll.collective(
          'gradient all-reduce', 'all-reduce', group, params['held'] * GRAD_BYTES, 1, hw
        )
      else:
        out.append(
          coll.collective(
            'expert gradient all-reduce', 'all-reduce', group, nbytes, m.num_layers, hw
          )
        )
  out = [dataclasses.replace(c, bytes=c.bytes * accum, count=c.count * accum) for c in out]
  if w.train and w.shard_optimizer:
    # The compute copy, once per step (mas_jax/zero.py): the replicated weights gathered from
    # all devices, and with data groups (ep < n) the experts from the ep-strided group holding
    # their shards. The gradients leave the strategy's all-reduces as they are (XLA slices each
    # device's share out of them): no reduce-scatter.
    dp_group = coll.strided(0, n // ep, ep)
    out.append(
      coll.collective(
        'compute-copy all-gather (shared weights)',
        'all-gather',
        list(range(n)),
        (params['shared'] if ep > 1 else params['held']) * m.act_bytes,
        1,
        hw,
      )
    )
    if 1 < ep < n:
      out.append(
        coll.collective(
          'compute-copy all-gather (experts)',
          'all-gather',
          dp_group,
          params['experts'] * m.act_bytes,
          1,
          hw,
        )
      )
  return out


def _memory(m: ModelSpec, w: Workload, n: int, ep: int, accum: int) -> dict[str, Memory]:
  held = held_params(m, ep)['held']
  if not w.train:
    kv = w.batch / n * w.context * m.num_layers * kv_bytes_per_token_layer(m)
    return {'all': Memory(params=held * m.act_bytes, activations=kv)}
  local_tokens = w.batch // accum / n * w.context
  per_token = layer_act_bytes_per_token(m)
  saved = m.num_layers * local_tokens * saved_per_token_layer(m, per_token)
  mem = temporaries(m, held, accum, saved, local_tokens * per_token, local_tokens)
  return shard_optimizer_memory(m, w, n, accum, held, {'all': Memory(**mem)})


def predict(
  m: ModelSpec, hw: Hardware, w: Workload, n: int, ep: int, cal: Calibration | None = None
) -> Prediction:
  """Step time, memory and collectives of ep (dp when ep = 1; see the module docstring)."""
  if ep > 1:
    m = m.on_capacity_buffers()
  reason = invalid(m, n, ep, w.batch)
  if reason:
    raise ValueError(f'ep{ep} on {n} devices: {reason}')
  k = Kernels(m, hw, cal)
  accum = fit_accumulation(hw, w, n, lambda a: _memory(m, w, n, ep, a))
  chunk = w.batch // accum
  local_seqs = chunk / n
  tokens = w.context if w.train else 1
  attn = k.attention(w, m.num_heads, local_seqs)
  pairs = local_seqs * tokens * m.top_k * (m.capacity if w.train else 1.0)
  if m.dropless or not w.train:  # computed rows follow the load: the busiest device's
    pairs *= m.imbalance(ep, replaces=False)  # ep keeps experts in place
  exp = k.experts(w, m.num_experts // ep, pairs, local_seqs * tokens * ep, m.expert_hidden)
  head = k.head(w, local_seqs, 1.0)
  colls = collectives(m, hw, w, n, ep, accum)
  times = [(c, coll.time(c, hw)) for c in colls]
  a2a = sum(t.time_s for c, t in times if c.kind == 'all-to-all')
  sync = sum(t.time_s for c, t in times if c.kind == 'all-reduce')
  bwd = backward_passes(m) if w.train else 0.0
  passes = 1 + bwd
  n_l = accum * m.num_layers
  held = held_params(m, ep)['held']
  opt = optimizer_update(held, hw, m) if w.train else Cost(0.0, 'hbm')
  # One device with accumulation casts its weights once per step (train_lib.cast_matmul_weights),
  # and with train.fuse_grad_accum (one layer only) its expert weight-gradient GEMMs add into the
  # accumulator.
  once = w.train and n == 1 and accum > 1
  fuse = once and w.fuse_grad_accum and m.num_layers == 1
  fused = m.num_experts * expert_params(m) if fuse else 0.0
  acc = accumulator_update(held, accum, hw, fused)
  compute = n_l * passes * (attn.time_s + exp.time_s) + accum * passes * head.time_s
  # Elementwise traffic (kernels.py): norms and residuals, dispatch / combine / dropout of this
  # device's tokens, the head's norm, gather and loss; casts of the matmul weights it reads
  # outside a calibrated kernel (the local experts, router, unembedding; attention unless timed).
  local_tokens = local_seqs * tokens
  routed = local_tokens * m.top_k
  slots = (
    routed
    if (m.routed_rows_only or not w.train)
    else local_seqs * m.num_experts * m.capacity_slots(tokens)
  )
  dropout = m.expert_dropout if w.train else 0.0
  per_layer = k.layer_elementwise(w, local_seqs).time_s
  per_layer += k.moe_elementwise(w, local_tokens, routed, slots, m.expert_hidden, dropout).time_s
  elem = (
    n_l * elementwise_passes(m, w) * per_layer + accum * k.head_elementwise(w, local_seqs).time_s
  )
  block = m.num_experts // ep * expert_params(m) + m.d_model * m.num_experts
  block += 0 if attn.measured else attn_params_per_layer(m)
  # The casts once per step are outside the micro-batches and so outside their rematerialisation.
  casts = (1 if once else accum) * (
    k.weight_casts(m.num_layers * block, 1.0 if once else cast_passes(m, w)).time_s
    + k.weight_casts(m.d_model * m.vocab_size, min(1.0, cast_passes(m, w))).time_s
  )
  step = compute + elem + casts + a2a + sync + opt.time_s + acc.time_s
  bound = 'scale-out' if n > hw.gpus_per_node else 'scale-up'
  terms = [
    Term('attention', n_l * passes * attn.time_s, attn.bound, attn.measured),
    Term('experts', n_l * passes * exp.time_s, exp.bound, exp.measured),
    Term('all_to_all', a2a, bound),
    Term('lm_head', accum * passes * head.time_s, head.bound),
    Term('elementwise', elem, 'hbm'),
    Term('weight_casts', casts, 'hbm'),
    Term('grad_allreduce', sync, bound),
    Term('optimizer', opt.time_s, opt.bound),
    Term('grad_accumulation', acc.time_s, acc.bound),
  ]
  name, split = ('ep', f'ep{ep}xdp{n // ep}') if ep > 1 else ('dp', f'dp{n}')
  return finish(
    m,
    hw,
    w,
    n,
    step,
    strategy=name,
    split=split,
    microbatches=1,
    busy={'all': compute / step},
    memory_by_role=_memory(m, w, n, ep, accum),
    terms=terms,
    accumulation=accum,
    collectives=colls,
  )
