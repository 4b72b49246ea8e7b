"""`tp_pp`: Megatron-style tensor parallelism inside a stage x GPipe pipeline parallelism.

Mesh (pipe, tensor) = (pp, tp), tp * pp == device count. Stage s holds layers
[s * L/pp, (s + 1) * L/pp). Inside a stage the tp devices split
  - attention by heads: wq, wk, wv column-wise [D, N/tp, H], wo row-wise [N/tp, H, D]; the output
    projection is a partial sum over heads that one psum over 'tensor' reduces;
  - every expert's FFN by its hidden dim F: w_in [E, D, F/tp], w_out [E, F/tp, D]; the combined
    MoE output is a partial sum over F, reduced by one psum over 'tensor'.
Norms, the router and the dispatch run replicated on the tp devices of a stage, so the routing
statistics are computed tp times and psum-ed over 'pipe' only (check_vma types them invariant
over 'tensor'). The embedding and the output head are replicated; the head runs on the last stage.

Pipeline: the global batch (replicated on every device) is cut into M micro-batches of B/M
sequences; one `lax.scan` runs M + pp - 1 ticks, in tick t stage s works on micro-batch t - s
and `ppermute`s its output to stage s + 1. Autodiff turns the scan around into the backward
ticks, so forward and backward follow the GPipe schedule, with bubble (pp - 1) / (M + pp - 1).
Ticks outside a stage's micro-batches compute on zeros and are masked out of the sums.

With parallel.pp_schedule='1f1b' the train step's gradients are computed by hand instead
(`value_and_grad`, `one_f_one_b`): 2 (M + pp - 1) ticks of one forward or one backward each, a
stage keeping the inputs of at most pp micro-batches (GPipe: the activations of all M), the
backward recomputing the stage's forward from its input. Same bubble, less memory, a forward
more per micro-batch. `loss` (evaluation) runs the GPipe forward with either schedule.

Generation runs the same ticks (`gpipe`, `tp_block`) on the new tokens, with the KV cache
[L, B, S, N, H] split like the weights (layers by stage, heads by tp) as the ticks' carried
state: in its tick a stage reads and writes the cache rows of its micro-batch, and writes nothing
on the other ticks. The head runs on the last stage; a psum over 'pipe' replicates the logits.

Dims: M micro-batches, G sequences per micro-batch, S tokens, D d_model, N heads, H head_dim,
E experts, C capacity, F expert hidden, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from mas_jax import model as model_lib
from mas_jax.config import Config, ConfigError, ModelConfig
from mas_jax.layers import attention as attn_lib
from mas_jax.layers import moe as moe_lib
from mas_jax.strategies import base
from mas_jax.strategies.ep import abstract_params, param_bytes_per_device

PIPE_AXIS = 'pipe'
TENSOR_AXIS = 'tensor'


def _vary(x: jax.Array, axis: str) -> jax.Array:
  """x cast to device-varying over axis (a no-op if it already is)."""
  if axis in jax.typeof(x).manual_axis_type.varying:
    return x
  return lax.pcast(x, (axis,), to='varying')


def tp_attention(
  cfg: ModelConfig, x: jax.Array, p: dict, cache: tuple | None = None
) -> tuple[jax.Array, tuple | None]:
  """Attention of normed x[G, T, D] on this device's heads, summed over 'tensor'.

  Args:
    cfg: model config.
    x: normed tokens [G, T, D] (the same on the tp devices of a stage).
    p: {'wq', 'wk', 'wv': [D, N/tp, H], 'wo': [N/tp, H, D]}.
    cache: None in training (causal over x's T positions), or in generation
      (k_cache, v_cache, start): this layer's cache rows [G, S, N/tp, H] of x's sequences and
      start[G] of the new tokens x (None: prefill from position 0; the cache is not read).

  Returns:
    out[G, T, D], and the new tokens' keys and values [G, T, N/tp, H] with a cache (else None).
  """
  if cache is None:
    positions = jnp.arange(x.shape[1])
    q, k, v = attn_lib.qkv_projection(x, p['wq'], p['wk'], p['wv'], positions, cfg.rope_base)
    o = attn_lib.causal_attention(q, k, v, cfg.attention_implementation)  # [G, T, N/tp, H]
    out, kv = attn_lib.output_projection(o, p['wo']), None  # [G, T, D]{U_tensor}
  else:
    out, k, v = attn_lib.attention_cached(x, p, *cache, cfg.rope_base)  # [G, T, D]{U_tensor}
    kv = (k, v)
  return lax.psum(out, TENSOR_AXIS), kv  # out[G,T,D]{U_tensor} -> out[G,T,D]


def tp_moe_ffn(
  cfg: ModelConfig, x: jax.Array, p: dict, cap: int, dropout_key, group_offset
) -> tuple[jax.Array, dict]:
  """MoE FFN of normed x[G, S, D] with this device's slice of every expert's hidden dim.

  Args:
    cfg: model config.
    x: normed tokens [G, S, D] (the same on the tp devices of a stage).
    p: {'router': [D, E], 'w_in': [E, D, F/tp], 'w_out': [E, F/tp, D]}.
    cap: capacity per group and expert.
    dropout_key: this layer's expert dropout key, or None.
    group_offset: global index of x's first group.

  Returns:
    y[G, S, D] (reduced over 'tensor') and the routing statistics of x's groups.
  """
  num_experts, f_local = cfg.num_experts, p['w_in'].shape[-1]
  with jax.named_scope('route'):
    route = moe_lib.router(x, p['router'], cfg.top_k)
    stats = moe_lib.routing_stats(route, num_experts)
    pos = moe_lib.dispatch_positions(route['experts'], num_experts)  # [G, S, K]
    stats['dropped'] = jnp.sum((pos >= cap).astype(jnp.float32))
  with jax.named_scope('dispatch'):
    xe = moe_lib.dispatch(x, route['experts'], pos, num_experts, cap)  # [G, E, C, D]
  with jax.named_scope('experts'):
    mask = None
    if dropout_key is not None and cfg.expert_dropout > 0:
      groups = group_offset + jnp.arange(x.shape[0])
      full = moe_lib.dropout_keep_mask(
        dropout_key, groups, jnp.arange(num_experts), (cap, cfg.expert_hidden), cfg.expert_dropout
      )  # [G, E, C, F]
      start = lax.axis_index(TENSOR_AXIS) * f_local
      mask = lax.dynamic_slice_in_dim(full, start, f_local, axis=3)  # [G, E, C, F/tp]
    ye = moe_lib.expert_ffn(
      xe, p['w_in'], p['w_out'], cfg.activation, mask, cfg.expert_dropout
    )  # [G, E, C, D]{U_tensor}
  with jax.named_scope('combine'):
    y = moe_lib.combine(ye, route['experts'], pos, route['gates'])  # [G, S, D]{U_tensor}
    y = lax.psum(y, TENSOR_AXIS)  # y[G,S,D]{U_tensor} -> y[G,S,D]
  return y, stats


def tp_block(
  cfg: ModelConfig,
  x: jax.Array,
  p: dict,
  cap: int,
  dropout_key: jax.Array | None,
  group_offset,
  cache: tuple | None = None,
) -> tuple[jax.Array, dict, tuple | None]:
  """One pre-norm block of a stage on x[G, T, D]: (x, routing stats, new (k, v) or None).

  `cache` is `tp_attention`'s: None in training, this layer's cache rows in generation.
  """
  with jax.named_scope('attention'):
    out, kv = tp_attention(cfg, attn_lib.rms_norm(x, p['attn_norm']['scale']), p['attn'], cache)
    x = x + out
  with jax.named_scope('moe'):
    h = attn_lib.rms_norm(x, p['mlp_norm']['scale'])
    y, stats = tp_moe_ffn(cfg, h, p['moe'], cap, dropout_key, group_offset)
  return x + y, stats, kv


def gpipe(stage_input, stage_fn, state, buf: jax.Array, num_microbatches: int):
  """The GPipe forward schedule over 'pipe': M + pp - 1 ticks, in tick t stage s runs m = t - s.

  Every device runs every tick (the ppermute is collective); a stage outside its micro-batches
  computes on whatever it holds and `stage_fn` must mask what it keeps (`valid` is False).

  Args:
    stage_input: i -> stage 0's input of micro-batch i, shaped like buf.
    stage_fn: (x, m, valid, state) -> (y, state, out): this stage's layers on micro-batch m.
    state: carried from tick to tick (the KV cache in generation, None in training).
    buf: zeros like one micro-batch's activations [G, T, D], varying over 'pipe'.
    num_microbatches: M.

  Returns:
    ys[M + pp - 1, G, T, D] (on the last stage ys[pp - 1:] are micro-batches 0..M-1 in order),
    the outs of every tick stacked the same way, and the final state.
  """
  pp, mb = lax.axis_size(PIPE_AXIS), num_microbatches
  stage = lax.axis_index(PIPE_AXIS)

  def tick(carry, t):
    buf, state = carry  # buf: what the previous stage sent in the last tick
    with jax.named_scope('stage'):
      m = t - stage  # this stage's micro-batch in tick t
      valid = (m >= 0) & (m < mb)
      m = jnp.clip(m, 0, mb - 1)
      x = jnp.where(stage == 0, stage_input(jnp.clip(t, 0, mb - 1)), buf)
      y, state, out = stage_fn(x, m, valid, state)
    with jax.named_scope('send'):
      if pp > 1:
        # y[G,T,D] of stage s -> stage s+1; stage 0 receives zeros.
        nxt = lax.ppermute(y, PIPE_AXIS, [(s, s + 1) for s in range(pp - 1)])
      else:
        nxt = y
    return (nxt, state), (y, out)

  (_, state), (ys, outs) = lax.scan(tick, (buf, state), jnp.arange(mb + pp - 1))
  return ys, outs, state


def on_last_stage(fn, zeros: jax.Array, *operands):
  """fn(*operands) on the last stage, `zeros` elsewhere; the caller psums over 'pipe'.

  A per-device cond runs fn only where it is needed; its operands are cast to varying over
  'pipe' beforehand, so that no collective (e.g. the transpose of an implicit pcast, a gradient
  psum) lands inside the cond. fn must hold no collective.
  """
  operands = jax.tree.map(lambda a: _vary(a, PIPE_AXIS), operands)
  is_last = lax.axis_index(PIPE_AXIS) == lax.axis_size(PIPE_AXIS) - 1
  return lax.cond(is_last, fn, lambda *_: _vary(zeros, PIPE_AXIS), *operands)


def _vary_pipe(tree):
  """Every leaf of tree cast to varying over 'pipe'."""
  return jax.tree.map(lambda a: _vary(a, PIPE_AXIS), tree)


def zeros_like_vary(tree):
  """Zeros like every leaf of tree, varying over 'pipe'."""
  return _vary_pipe(jax.tree.map(jnp.zeros_like, tree))


def _write_rows(
  cache: jax.Array, layer: int, row0, new: jax.Array, start: jax.Array | None, valid
) -> jax.Array:
  """cache[L, B, S, N, H] with new[G, T, N, H] written into rows row0.. at start[g] (None: 0).

  On an invalid tick the rows point past B and the scatter drops them: nothing is written and
  nothing is copied.
  """
  g, t = new.shape[:2]
  rows = jnp.where(valid, row0 + jnp.arange(g), cache.shape[1])[:, None]  # [G, 1]
  pos = jnp.arange(t)[None, :]  # [1, T]
  if start is not None:
    pos = start[:, None] + pos  # [G, T]
  return cache.at[layer, rows, pos].set(new.astype(cache.dtype), mode='drop')


def _stage_forward(mcfg: ModelConfig, cap: int, blocks_local, keys_local, x, group_offset):
  """This stage's layers on x[G, S, D] (the same on the stage's tp devices): (y, summed stats)."""

  def block(x, layer):
    p, key = layer
    x, stats, _ = tp_block(mcfg, x, p, cap, key, group_offset)
    return x, stats

  x, stats = lax.scan(model_lib.remat(block, mcfg), x, (blocks_local, keys_local))
  return x, jax.tree.map(lambda s: jnp.sum(s, axis=0), stats)


def _stage_keys(key: jax.Array | None, layers_local: int) -> jax.Array | None:
  """The dropout keys of this stage's layers: fold_in(key, global layer), = model.layer_keys."""
  if key is None:
    return None
  layer_ids = lax.axis_index(PIPE_AXIS) * layers_local + jnp.arange(layers_local)
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(layer_ids)


_SCHEDULE_NAMES = {'gpipe': 'GPipe', '1f1b': '1F1B'}
IDLE, FORWARD, BACKWARD = 0, 1, 2


def one_f_one_b(pp: int, num_microbatches: int) -> np.ndarray:
  """The 1F1B tick table: int32[ticks, pp, 4] of (op, m, m_in, m_cot) per tick and stage.

  op is IDLE, FORWARD or BACKWARD of micro-batch m. Stage s runs min(pp - 1 - s, M) warm-up
  forwards, then alternates forward and backward, then drains its backwards; each op runs in the
  first tick its input is there (one tick per op, whatever its cost), which gives 2 (M + pp - 1)
  ticks. m_in (m_cot) is the micro-batch whose stage input (output cotangent) the stage receives
  at the end of the tick from stage s - 1 (s + 1), or -1. Checked here: a stage holds at most pp
  received stage inputs (a ring of pp slots, slot m % pp) and at most one cotangent.
  """
  mb = num_microbatches
  order = []
  for s in range(pp):
    warm = min(pp - 1 - s, mb)
    ops = [(FORWARD, m) for m in range(warm)]
    for i in range(mb - warm):
      ops += [(FORWARD, warm + i), (BACKWARD, i)]
    order.append(ops + [(BACKWARD, m) for m in range(mb - warm, mb)])
  done: dict[tuple[int, int, int], int] = {}  # (op, stage, m) -> tick

  def ready(s, op, m, t):
    if op == FORWARD:
      dep = None if s == 0 else (FORWARD, s - 1, m)
    else:
      dep = (FORWARD, s, m) if s == pp - 1 else (BACKWARD, s + 1, m)
    return dep is None or done.get(dep, t) < t

  rows, nxt = [], [0] * pp
  while any(nxt[s] < len(order[s]) for s in range(pp)):
    t, row = len(rows), []
    for s in range(pp):
      op = order[s][nxt[s]] if nxt[s] < len(order[s]) else None
      row.append(op if op and ready(s, *op, t) else (IDLE, 0))
    for s, (op, m) in enumerate(row):
      if op != IDLE:
        done[op, s, m] = t
        nxt[s] += 1
    rows.append(row)
  table = np.zeros((len(rows), pp, 4), np.int32)
  table[:, :, :2] = np.array(rows, np.int32)
  op, m = table[:, :, 0], table[:, :, 1]
  table[:, :, 2:] = -1
  table[:, 1:, 2] = np.where(op[:, :-1] == FORWARD, m[:, :-1], -1)
  table[:, :-1, 3] = np.where(op[:, 1:] == BACKWARD, m[:, 1:], -1)
  for s in range(pp):
    # A stage input lives from its arrival (stage 0: its forward looks it up) to its backward.
    arrive = [done[FORWARD, s - 1, i] if s else done[FORWARD, 0, i] - 1 for i in range(mb)]
    cot = [done[BACKWARD, s + 1, i] if s < pp - 1 else done[BACKWARD, s, i] for i in range(mb)]
    for t in range(len(rows)):
      live = sum(arrive[i] < t <= done[BACKWARD, s, i] for i in range(mb))
      waiting = sum(cot[i] < t <= done[BACKWARD, s, i] for i in range(mb))
      assert live <= pp and waiting <= 1, (pp, mb, s, t, live, waiting)
  return table


class TensorPipeline(base.Strategy):
  """Tensor parallelism over 'tensor' inside each of the 'pipe' stages (GPipe or 1F1B)."""

  name = 'tp_pp'

  def __init__(self, config: Config, devices=None):
    super().__init__(config, devices)
    m, par, n = config.model, config.parallel, len(self.devices)
    tp, pp, mb = par.tp, par.pp, par.num_microbatches
    if tp <= 0 or pp <= 0 or tp * pp != n:
      raise ConfigError(f'parallel.tp={tp} x parallel.pp={pp} = {tp * pp} != device count {n}')
    if m.num_heads % tp:
      raise ConfigError(f'model.num_heads={m.num_heads} is not divisible by parallel.tp={tp}')
    if m.expert_hidden % tp:
      raise ConfigError(
        f'model.expert_hidden={m.expert_hidden} is not divisible by parallel.tp={tp}'
      )
    if m.num_layers % pp:
      raise ConfigError(f'model.num_layers={m.num_layers} is not divisible by parallel.pp={pp}')
    self.check_batch(mb, 'parallel.num_microbatches')
    self._mesh = jax.make_mesh(
      (pp, tp),
      (PIPE_AXIS, TENSOR_AXIS),
      devices=self.devices,
      axis_types=(jax.sharding.AxisType.Auto,) * 2,
    )

  @property
  def mesh(self):
    return self._mesh

  @property
  def bubble_fraction(self) -> float:
    """Idle fraction of a stage, GPipe and 1F1B alike: (pp - 1) / (M + pp - 1)."""
    pp, mb = self.config.parallel.pp, self.config.parallel.num_microbatches
    return (pp - 1) / (mb + pp - 1)

  def param_specs(self, params):
    specs = jax.tree.map(lambda _: P(), params)
    # Every block parameter has a leading layer axis [L, ...]: split it into stages.
    specs['blocks'] = jax.tree.map(lambda _: P(PIPE_AXIS), params['blocks'])
    attn, moe = specs['blocks']['attn'], specs['blocks']['moe']
    for name in ('wq', 'wk', 'wv'):
      attn[name] = P(PIPE_AXIS, None, TENSOR_AXIS, None)  # [L, D, N, H]: column-wise
    attn['wo'] = P(PIPE_AXIS, TENSOR_AXIS, None, None)  # [L, N, H, D]: row-wise
    moe['w_in'] = P(PIPE_AXIS, None, None, TENSOR_AXIS)  # [L, E, D, F]
    moe['w_out'] = P(PIPE_AXIS, None, TENSOR_AXIS, None)  # [L, E, F, D]
    return specs

  def batch_spec(self):
    return P()

  def describe(self) -> str:
    cfg, par = self.config, self.config.parallel
    params = abstract_params(cfg.model)
    param_bytes = param_bytes_per_device(self.mesh, self.param_specs(params), params)
    return '\n'.join(
      [
        f'strategy=tp_pp mesh={dict(self.mesh.shape)}: {cfg.model.num_layers // par.pp} layers '
        f'per stage, {cfg.model.num_heads // par.tp} heads and '
        f'{cfg.model.expert_hidden // par.tp} expert hidden units per device',
        f'tp_pp: {_SCHEDULE_NAMES[par.pp_schedule]} with {par.num_microbatches} micro-batches of '
        f'{cfg.data.batch_size // par.num_microbatches} sequences; pipeline bubble fraction '
        f'(pp-1)/(M+pp-1) = {self.bubble_fraction:.3f}',
        self.uniform_memory_line(param_bytes),
      ]
    )

  def _step_shapes(self):
    """(config, model config, pp, M, sequences per micro-batch, layers per stage, compute
    dtype, expert capacity) of a train step: what loss and the 1F1B value_and_grad share."""
    cfg = self.config
    mcfg = cfg.model
    pp, mb = cfg.parallel.pp, cfg.parallel.num_microbatches
    cap = moe_lib.capacity(
      cfg.data.seq_len, mcfg.top_k, mcfg.num_experts, mcfg.capacity_factor, mcfg.dropless
    )
    group = cfg.data.batch_size // mb  # sequences per micro-batch
    return cfg, mcfg, pp, mb, group, mcfg.num_layers // pp, jnp.dtype(mcfg.compute_dtype), cap

  def loss(self, params, batch, dropout_key, residual=None):
    cfg, mcfg, pp, mb, group, layers_local, dtype, cap = self._step_shapes()

    def stage_forward(blocks_local, keys_local, x, group_offset):
      return _stage_forward(mcfg, cap, blocks_local, keys_local, x, group_offset)

    def head(x, head_params, targets):
      # x: f32[M, G, S, D], the last stage's outputs of every micro-batch.
      return model_lib.head_cross_entropy_sum(mcfg, head_params, x, targets)

    def local_loss(params, batch, key):
      # batch: i32[B, T+1] (replicated); blocks: this stage's L/pp layers, F and N split by tp.
      tokens = batch.reshape(mb, group, batch.shape[1])  # [M, G, S+1]
      inputs, targets = tokens[..., :-1], tokens[..., 1:]
      keys_local = _stage_keys(key, layers_local)

      def stage_fn(x, m, valid, state):
        y, stats = stage_forward(params['blocks'], keys_local, x, m * group)
        return y, state, jax.tree.map(lambda s: jnp.where(valid, s, 0.0), stats)

      embed = lambda i: params['embed'][inputs[i]].astype(dtype)  # [G, S, D]
      buf = _vary(jnp.zeros((group, cfg.data.seq_len, mcfg.d_model), dtype), PIPE_AXIS)
      ys, stats, _ = gpipe(embed, stage_fn, None, buf, mb)
      stats = jax.tree.map(lambda s: jnp.sum(s, axis=0), stats)
      with jax.named_scope('head'):
        # The gradient psum of the replicated head parameters happens outside the cond.
        head_params = {'final_norm': params['final_norm'], 'unembed': params['unembed']}
        ce_sum = on_last_stage(head, jnp.zeros((), jnp.float32), ys[pp - 1 :], head_params, targets)
      # sums[..]{U_pipe} -> sums[..]: the head's cross entropy and every stage's layer statistics.
      ce_sum, stats = lax.psum((ce_sum, stats), PIPE_AXIS)
      return base.finalize(cfg, ce_sum, stats)

    return self.shard_loss(local_loss, params, batch, dropout_key, residual)

  # -------------------------------------------------------------------------------------------
  # Training with the 1F1B schedule: gradients computed tick by tick inside the shard_map.
  # -------------------------------------------------------------------------------------------

  def value_and_grad(self, params, batch, dropout_key):
    if self.config.parallel.pp_schedule == 'gpipe':
      return super().value_and_grad(params, batch, dropout_key)
    return self._value_and_grad_1f1b(params, batch, dropout_key)

  def _value_and_grad_1f1b(self, params, batch, dropout_key):
    """((loss, metrics), grads) by the 1F1B schedule (`one_f_one_b`), equal to autodiff's.

    One `lax.scan` over the tick table; in a tick each stage runs a forward or a backward of one
    micro-batch in a per-stage `lax.cond` (its collectives are over 'tensor', inside the stage),
    then every stage joins two ppermutes: outputs to s + 1, input cotangents to s - 1. A forward
    keeps nothing but its stage input (in a ring of pp slots); the backward recomputes the
    stage's forward from it under `jax.vjp`. The loss is linear in the cross-entropy sum and the
    routing statistics' sums (`base.finalize`), so each backward starts from constant
    cotangents of its statistics and, on the last stage, of its head's cross entropy.
    Parameter gradients accumulate in the scan's carry; those of the replicated embedding and
    head are psum-ed over 'pipe' at the end, as autodiff's transpose of their broadcast does.
    """
    cfg, mcfg, pp, mb, group, layers_local, dtype, cap = self._step_shapes()
    table = jnp.asarray(one_f_one_b(pp, mb))  # [ticks, pp, 4]
    head_names = ('final_norm', 'unembed')

    def head_ce(head_params, y, targets):
      # y: [G, S, D] the last stage's output of one micro-batch -> its cross-entropy sum.
      return model_lib.head_cross_entropy_sum(mcfg, head_params, y, targets)

    def local_value_and_grad(params, batch, key):
      stage = lax.axis_index(PIPE_AXIS)
      is_first, is_last = stage == 0, stage == pp - 1
      tokens = batch.reshape(mb, group, batch.shape[1])  # [M, G, S+1]
      inputs, targets = tokens[..., :-1], tokens[..., 1:]
      keys_local = _stage_keys(key, layers_local)
      blocks = params['blocks']
      # Cast before the conds, so that nothing inside them is transposed into a psum over 'pipe'.
      head_params = _vary_pipe({k: params[k] for k in head_names})

      def stage_fn(blocks, x, m):
        return _stage_forward(mcfg, cap, blocks, keys_local, x, m * group)

      # d loss / d (ce_sum, stats): constants, the loss being linear in them.
      buf = _vary(jnp.zeros((group, cfg.data.seq_len, mcfg.d_model), dtype), PIPE_AXIS)
      stats_shape = jax.eval_shape(lambda: stage_fn(blocks, buf, 0)[1])
      zero_stats = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), stats_shape)
      d_ce, d_stats = jax.grad(lambda c, st: base.finalize(cfg, c, st)[0], argnums=(0, 1))(
        jnp.zeros((), jnp.float32), zero_stats
      )
      d_ce, d_stats = _vary_pipe((d_ce, d_stats))

      def forward(x, dy, m, grads):
        y, stats = stage_fn(blocks, x, m)
        return y, jnp.zeros_like(x), stats, grads, _vary(jnp.zeros(()), PIPE_AXIS)

      def backward(x, dy, m, grads):
        (y, stats), stage_vjp = jax.vjp(lambda b, x: stage_fn(b, x, m), blocks, x)

        def head_vjp(y, head_params, targets):
          ce, vjp = jax.vjp(lambda y, hp: head_ce(hp, y, targets), y, head_params)
          return *vjp(d_ce), ce

        def no_head(y, head_params, targets):
          del targets
          return jnp.zeros_like(y), zeros_like_vary(head_params), _vary(jnp.zeros(()), PIPE_AXIS)

        with jax.named_scope('head'):
          dy_head, d_head, ce = lax.cond(is_last, head_vjp, no_head, y, head_params, targets[m])
        d_blocks, dx = stage_vjp((jnp.where(is_last, dy_head, dy), d_stats))
        grads = {
          'blocks': jax.tree.map(jnp.add, grads['blocks'], d_blocks),
          **{k: jax.tree.map(jnp.add, grads[k], d_head[k]) for k in head_names},
          'embed': grads['embed'],
        }
        return y, dx, stats, grads, ce

      def tick(carry, row):
        ring, dy, grads, stats_sum, ce_sum = carry
        op, m, m_in, m_cot = row[stage]  # this stage's entry of the tick table
        # x: [G, S, D] micro-batch m's stage input (stage 0 looks it up again in its backward).
        x = jnp.where(is_first, params['embed'][inputs[m]].astype(dtype), ring[m % pp])
        with jax.named_scope('stage'):
          y, dx, stats, grads, ce = lax.cond(op == BACKWARD, backward, forward, x, dy, m, grads)
        is_fwd = op == FORWARD
        stats_sum = jax.tree.map(lambda a, b: a + jnp.where(is_fwd, b, 0.0), stats_sum, stats)
        # Stage 0's input cotangent goes into the embedding (the transpose of the lookup).
        rows = jnp.where(is_first & (op == BACKWARD), inputs[m], mcfg.vocab_size)  # [G, S]
        grads['embed'] = grads['embed'].at[rows].add(dx.astype(grads['embed'].dtype), mode='drop')
        with jax.named_scope('send'):
          if pp > 1:
            # y[G,S,D] of stage s -> stage s+1 and dx[G,S,D] of stage s -> stage s-1; what a
            # stage receives is kept where the table says the sender ran that op.
            y = lax.ppermute(y, PIPE_AXIS, [(s, s + 1) for s in range(pp - 1)])
            dx = lax.ppermute(dx, PIPE_AXIS, [(s + 1, s) for s in range(pp - 1)])
          ring = ring.at[jnp.where(m_in >= 0, m_in % pp, pp)].set(y, mode='drop')
          dy = jnp.where(m_cot >= 0, dx, dy)
        return (ring, dy, grads, stats_sum, ce_sum + ce), None

      grads = {
        'blocks': jax.tree.map(jnp.zeros_like, blocks),
        'embed': _vary(jnp.zeros_like(params['embed']), PIPE_AXIS),
        **zeros_like_vary(head_params),
      }
      ring = _vary(jnp.zeros((pp, *buf.shape), dtype), PIPE_AXIS)  # [pp, G, S, D]
      carry = (ring, buf, grads, _vary_pipe(zero_stats), _vary(jnp.zeros(()), PIPE_AXIS))
      (_, _, grads, stats, ce_sum), _ = lax.scan(tick, carry, table)
      # sums[..]{U_pipe} -> sums[..]: the head's cross entropy and every stage's statistics;
      # the replicated parameters' gradients (embedding on stage 0, head on the last stage).
      ce_sum, stats = lax.psum((ce_sum, stats), PIPE_AXIS)
      for k in ('embed', *head_names):
        grads[k] = lax.psum(grads[k], PIPE_AXIS)
      return base.finalize(cfg, ce_sum, stats), grads

    specs = self.param_specs(params)
    return jax.shard_map(
      local_value_and_grad,
      mesh=self.mesh,
      in_specs=(specs, self.batch_spec(), P()),
      out_specs=((P(), P()), specs),
    )(params, batch, dropout_key)

  # -------------------------------------------------------------------------------------------
  # Generation: the training pipeline with the KV cache as the ticks' carried state.
  # -------------------------------------------------------------------------------------------

  def decode_batch_multiple(self):
    return self.config.parallel.num_microbatches

  def cache_spec(self):
    # [L, B, S, N, H]: each stage the cache of its layers, each tp device that of its heads.
    return P(PIPE_AXIS, None, None, TENSOR_AXIS, None)

  def forward_cached(self, params, cache, tokens, start):
    """Prefill or decode step through the pipeline; logits[B, T, V] come out replicated.

    Micro-batch m is rows m*B/M .. (m+1)*B/M - 1 of the batch; in its tick a stage reads those
    rows of its layers' cache and writes the new keys and values into them.
    """
    mcfg = self.config.model
    pp, mb = self.config.parallel.pp, self.config.parallel.num_microbatches
    b, t = tokens.shape
    if b % mb:
      raise ConfigError(
        f'decode batch {b} does not divide into parallel.num_microbatches={mb} (pad it to a '
        f'multiple of {self.decode_batch_multiple()}, as mas_jax.decode.Generator does)'
      )
    group = b // mb  # sequences per micro-batch
    dtype = jnp.dtype(mcfg.compute_dtype)
    # Dropless: one slot per new token of a sequence and expert.
    cap = moe_lib.capacity(t, mcfg.top_k, mcfg.num_experts, mcfg.capacity_factor, dropless=True)

    def local_forward(params, cache, tokens, start):
      # tokens: i32[B, T], start: i32[B] or None (replicated); cache: [L/pp, B, S, N/tp, H].
      tokens = tokens.reshape(mb, group, t)
      starts = None if start is None else start.reshape(mb, group)

      def stage_fn(x, m, valid, cache):
        row0 = m * group
        s_m = None if starts is None else starts[m]  # [G]
        for layer in range(mcfg.num_layers // pp):
          p = jax.tree.map(lambda a, i=layer: a[i], params['blocks'])
          rows = (None, None)  # prefill reads no cache
          if s_m is not None:
            rows = tuple(
              lax.dynamic_slice_in_dim(cache[n][layer], row0, group, axis=0) for n in 'kv'
            )  # [G, S, N/tp, H] each
          x, _, (k, v) = tp_block(mcfg, x, p, cap, None, 0, (*rows, s_m))
          cache = {
            'k': _write_rows(cache['k'], layer, row0, k, s_m, valid),
            'v': _write_rows(cache['v'], layer, row0, v, s_m, valid),
          }
        return x, cache, None

      embed = lambda i: params['embed'][tokens[i]].astype(dtype)  # [G, T, D]
      buf = _vary(jnp.zeros((group, t, mcfg.d_model), dtype), PIPE_AXIS)
      ys, _, cache = gpipe(embed, stage_fn, cache, buf, mb)
      with jax.named_scope('head'):
        head_params = {'final_norm': params['final_norm'], 'unembed': params['unembed']}
        zeros = jnp.zeros((mb, group, t, mcfg.vocab_size), jnp.float32)
        logits = on_last_stage(model_lib.head_logits, zeros, head_params, ys[pp - 1 :])
      # logits[M,G,T,V]{U_pipe} -> logits[M,G,T,V]: the last stage's logits to every device.
      logits = lax.psum(logits, PIPE_AXIS)
      return logits.reshape(b, t, mcfg.vocab_size), cache

    cache_specs = {'k': self.cache_spec(), 'v': self.cache_spec()}
    return jax.shard_map(
      local_forward,
      mesh=self.mesh,
      in_specs=(self.param_specs(params), cache_specs, P(), P()),
      out_specs=(P(), cache_specs),
    )(params, cache, tokens, start)
