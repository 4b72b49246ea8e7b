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


class TensorPipeline(base.Strategy):
  """Tensor parallelism over 'tensor' inside each of the 'pipe' stages (GPipe)."""

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
    """GPipe idle fraction of a stage: (pp - 1) / (M + pp - 1)."""
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
        f'tp_pp: GPipe with {par.num_microbatches} micro-batches of '
        f'{cfg.data.batch_size // par.num_microbatches} sequences; pipeline bubble fraction '
        f'(pp-1)/(M+pp-1) = {self.bubble_fraction:.3f}',
        self.uniform_memory_line(param_bytes),
      ]
    )

  def loss(self, params, batch, dropout_key):
    cfg = self.config
    mcfg = cfg.model
    pp, mb = cfg.parallel.pp, cfg.parallel.num_microbatches
    group = cfg.data.batch_size // mb  # sequences per micro-batch
    layers_local = mcfg.num_layers // pp
    dtype = jnp.dtype(mcfg.compute_dtype)
    cap = moe_lib.capacity(
      cfg.data.seq_len, mcfg.top_k, mcfg.num_experts, mcfg.capacity_factor, mcfg.dropless
    )

    def stage_forward(blocks_local, keys_local, x, group_offset):
      # x: f32[G, S, D], the same on the stage's tp devices; blocks_local: this stage's layers.
      def block(x, layer):
        p, key = layer
        x, stats, _ = tp_block(mcfg, x, p, cap, key, group_offset)
        return x, stats

      x, stats = lax.scan(model_lib.remat(block, mcfg), x, (blocks_local, keys_local))
      return x, jax.tree.map(lambda s: jnp.sum(s, axis=0), stats)

    def head(x, head_params, targets):
      # x: f32[M, G, S, D], the last stage's outputs of every micro-batch.
      x = attn_lib.rms_norm(x, head_params['final_norm']['scale'])
      logits = jnp.einsum('MGSD,DV->MGSV', x, head_params['unembed'].astype(dtype))
      return model_lib.cross_entropy_sum(logits.astype(jnp.float32), targets)

    def local_loss(params, batch, key):
      # batch: i32[B, T+1] (replicated); blocks: this stage's L/pp layers, F and N split by tp.
      stage = lax.axis_index(PIPE_AXIS)
      tokens = batch.reshape(mb, group, batch.shape[1])  # [M, G, S+1]
      inputs, targets = tokens[..., :-1], tokens[..., 1:]
      keys_local = None
      if key is not None:
        layer_ids = stage * layers_local + jnp.arange(layers_local)
        keys_local = jax.vmap(lambda i: jax.random.fold_in(key, i))(layer_ids)  # = layer_keys

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

    return jax.shard_map(
      local_loss,
      mesh=self.mesh,
      in_specs=(self.param_specs(params), self.batch_spec(), P()),
      out_specs=(P(), P()),
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
