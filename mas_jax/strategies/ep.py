"""`ep`: expert parallelism with data-parallel attention (the MaxText / Megatron-Core standard).

Mesh (data, expert) = (n / ep, ep). The batch is sharded by sequence over all n devices; every
device runs attention, the router and the norms on its own sequences with replicated weights.
The experts of every layer are split over the 'expert' axis (E/ep per device) and replicated over
'data'. In each MoE layer a device fills capacity buffers [G, E, C, D] for its groups, one
`all_to_all` over 'expert' sends each expert's slots to the device that holds it (splitting E,
concatenating groups), the local experts run on [ep*G, E/ep, C, D], and a second `all_to_all`
brings the outputs back for the combine. Loss sums and routing statistics are psum-ed over both
axes; replicated weights get their gradient all-reduce from the transpose of their implicit
broadcast, as in `dp`.

Generation places the sequences and their KV cache the same way (each device the cache of its
sequences, all heads) and runs the same blocks on the new tokens; the MoE keeps its two
all_to_all with dropless capacity C = T, the new tokens of a sequence.

Dims: G groups (sequences) per device, S tokens, D d_model, E experts, C capacity, F expert hidden.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

from mas_jax import model as model_lib
from mas_jax.config import Config, ConfigError, ModelConfig
from mas_jax.layers import attention as attn_lib
from mas_jax.layers import moe as moe_lib
from mas_jax.strategies import base

DATA_AXIS = 'data'
EXPERT_AXIS = 'expert'


def abstract_params(cfg: ModelConfig) -> dict:
  """Shapes and dtypes of the parameter dict, without allocating it."""
  return jax.eval_shape(
    lambda: nnx.to_pure_dict(nnx.state(model_lib.Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  )


def param_bytes_per_device(mesh: jax.sharding.Mesh, specs: dict, params: dict) -> int:
  """Bytes of parameters one device holds, from each leaf's shape and PartitionSpec."""

  def leaf_bytes(spec: P, p) -> int:
    shards = 1
    for axes in spec:
      for axis in (axes,) if isinstance(axes, str) else axes or ():
        shards *= mesh.shape[axis]
    return math.prod(p.shape) * jnp.dtype(p.dtype).itemsize // shards

  leaves = jax.tree.leaves(
    jax.tree.map(leaf_bytes, specs, params, is_leaf=lambda x: isinstance(x, P))
  )
  return sum(leaves)


def ep_moe_ffn(
  cfg: ModelConfig, x: jax.Array, p: dict, cap: int, dropout_key: jax.Array | None, offset
) -> tuple[jax.Array, dict]:
  """The MoE FFN of one device of the 'expert' axis; normed x[G, S, D] -> y[G, S, D], stats.

  Args:
    cfg: model config.
    x: this device's normed groups [G, S, D].
    p: {'router': [D, E], 'w_in': [E/ep, D, F], 'w_out': [E/ep, F, D]} (this device's experts).
    cap: capacity per group and expert.
    dropout_key: this layer's expert dropout key, or None.
    offset: global index of the first group of this device's row of the 'expert' axis.
  """
  num_experts = cfg.num_experts
  ep = lax.axis_size(EXPERT_AXIS)
  g = x.shape[0]
  with jax.named_scope('route'):
    route = moe_lib.router(x, p['router'], cfg.top_k)
    stats = moe_lib.routing_stats(route, num_experts)
    pos = moe_lib.dispatch_positions(route['experts'], num_experts)  # [G, S, K]
    stats['dropped'] = jnp.sum((pos >= cap).astype(jnp.float32))
  with jax.named_scope('dispatch'):
    xe_local = moe_lib.dispatch(x, route['experts'], pos, num_experts, cap)  # [G, E, C, D]
    # xe[G, E_expert, C, D] -> xe[G*ep, E/ep, C, D]: each expert's slots go to its owner.
    xe_local = lax.all_to_all(xe_local, EXPERT_AXIS, 1, 0, tiled=True)
  with jax.named_scope('experts'):
    mask = None
    if dropout_key is not None and cfg.expert_dropout > 0:
      # Received groups are those of expert-axis devices 0..ep-1 of this row, in order.
      groups = offset + jnp.arange(ep * g)
      experts = lax.axis_index(EXPERT_AXIS) * (num_experts // ep) + jnp.arange(num_experts // ep)
      mask = moe_lib.dropout_keep_mask(
        dropout_key, groups, experts, (cap, cfg.expert_hidden), cfg.expert_dropout
      )
    ye_local = moe_lib.expert_ffn(
      xe_local, p['w_in'], p['w_out'], cfg.activation, mask, cfg.expert_dropout
    )  # [G*ep, E/ep, C, D]
  with jax.named_scope('combine'):
    # ye[G_expert, E/ep, C, D] -> ye[G, E, C, D]: outputs return to the groups' devices.
    ye_local = lax.all_to_all(ye_local, EXPERT_AXIS, 0, 1, tiled=True)
    y = moe_lib.combine(ye_local, route['experts'], pos, route['gates'])  # [G, S, D]
  return y, stats


def ep_block(
  cfg: ModelConfig,
  x: jax.Array,
  p: dict,
  cap: int,
  dropout_key: jax.Array | None,
  offset,
  cache: tuple | None = None,
) -> tuple[jax.Array, dict, tuple | None]:
  """One pre-norm block on this device's sequences x[G, T, D]: (x, routing stats, new (k, v)).

  Attention runs locally on all heads (replicated weights); the MoE is `ep_moe_ffn`.

  Args:
    cfg, cap, dropout_key, offset: as in `ep_moe_ffn`.
    x: this device's sequences [G, T, D].
    p: one layer's parameters (this device's experts).
    cache: None in training (causal over x's T positions), or in generation
      (k_cache, v_cache, start): this layer's cache [G, S, N, H] of x's sequences and start[G]
      of the new tokens x (None: prefill from position 0; the cache is not read).

  Returns:
    x, the routing statistics, and with a cache the new tokens' keys and values [G, T, N, H].
  """
  with jax.named_scope('attention'):
    h = attn_lib.rms_norm(x, p['attn_norm']['scale'])
    if cache is None:
      positions = jnp.arange(x.shape[1])
      out = attn_lib.attention(
        h, p['attn'], positions, cfg.rope_base, implementation=cfg.attention_implementation
      )
      kv = None
    else:
      out, k, v = attn_lib.attention_cached(h, p['attn'], *cache, cfg.rope_base)
      kv = (k, v)
    x = x + out
  with jax.named_scope('moe'):
    h = attn_lib.rms_norm(x, p['mlp_norm']['scale'])
    y, stats = ep_moe_ffn(cfg, h, p['moe'], cap, dropout_key, offset)
  return x + y, stats, kv


class ExpertParallel(base.Strategy):
  """Experts split over 'expert', everything else data parallel over all devices."""

  name = 'ep'

  def __init__(self, config: Config, devices=None):
    super().__init__(config, devices)
    n, ep, e = len(self.devices), config.parallel.ep, config.model.num_experts
    if ep <= 0 or n % ep:
      raise ConfigError(f'parallel.ep={ep} does not divide the device count {n}')
    if e % ep:
      raise ConfigError(f'model.num_experts={e} is not divisible by parallel.ep={ep}')
    self.check_batch(n, 'devices (data x expert)')
    self._mesh = jax.make_mesh(
      (n // ep, ep),
      (DATA_AXIS, EXPERT_AXIS),
      devices=self.devices,
      axis_types=(jax.sharding.AxisType.Auto,) * 2,
    )

  @property
  def mesh(self):
    return self._mesh

  def param_specs(self, params):
    specs = jax.tree.map(lambda _: P(), params)
    # w_in[L, E, D, F], w_out[L, E, F, D]: experts split over the expert axis.
    specs['blocks']['moe']['w_in'] = P(None, EXPERT_AXIS, None, None)
    specs['blocks']['moe']['w_out'] = P(None, EXPERT_AXIS, None, None)
    return specs

  def batch_spec(self):
    return P((DATA_AXIS, EXPERT_AXIS))

  def describe(self) -> str:
    cfg, n = self.config, len(self.devices)
    params = abstract_params(cfg.model)
    param_bytes = param_bytes_per_device(self.mesh, self.param_specs(params), params)
    return '\n'.join(
      [
        f'strategy=ep mesh={dict(self.mesh.shape)}: attention data parallel over {n} devices, '
        f'{cfg.model.num_experts // cfg.parallel.ep} experts per device',
        f'ep: {cfg.data.batch_size // n} sequences per device; 2 all_to_all per MoE layer '
        f'forward (dispatch, combine)',
        self.uniform_memory_line(param_bytes),
      ]
    )

  def loss(self, params, batch, dropout_key, residual=None):
    cfg = self.config
    mcfg = cfg.model
    local_b = cfg.data.batch_size // len(self.devices)
    ep = self.mesh.shape[EXPERT_AXIS]
    cap = moe_lib.capacity(
      cfg.data.seq_len, mcfg.top_k, mcfg.num_experts, mcfg.capacity_factor, mcfg.dropless
    )

    def local_loss(params, batch_local, key):
      # batch_local: i32[B/n, T+1]; device (d, e) holds sequences (d*ep + e) * B/n onwards, so
      # the 'expert' row d holds ep * B/n consecutive sequences from row_offset.
      row_offset = lax.axis_index(DATA_AXIS) * ep * local_b
      inputs, targets = batch_local[:, :-1], batch_local[:, 1:]
      dtype = jnp.dtype(mcfg.compute_dtype)
      x = params['embed'][inputs].astype(dtype)  # [G, S, D]
      keys = model_lib.layer_keys(key, mcfg.num_layers)

      @functools.partial(model_lib.remat, cfg=mcfg)
      def body(x, layer):
        # x: f32[G, S, D] this device's sequences; layer: one layer, local experts.
        p, k = layer
        x, stats, _ = ep_block(mcfg, x, p, cap, k, row_offset)
        return x, stats

      x, stats = lax.scan(body, x, (params['blocks'], keys))
      stats = jax.tree.map(lambda s: jnp.sum(s, axis=0), stats)
      ce_sum = model_lib.head_cross_entropy_sum(mcfg, params, x, targets)
      # sums[..]{U_data,U_expert} -> sums[..]: the global batch's loss and routing statistics.
      ce_sum, stats = lax.psum((ce_sum, stats), (DATA_AXIS, EXPERT_AXIS))
      return base.finalize(cfg, ce_sum, stats)

    return self.shard_loss(local_loss, params, batch, dropout_key, residual)

  # -------------------------------------------------------------------------------------------
  # Generation: each device its own sequences and their KV cache, the experts through all_to_all.
  # -------------------------------------------------------------------------------------------

  def decode_batch_multiple(self):
    return len(self.devices)

  def cache_spec(self):
    return P(None, (DATA_AXIS, EXPERT_AXIS))  # [L, B, S, N, H]: the cache of its sequences

  def forward_cached(self, params, cache, tokens, start):
    """Prefill or decode step; groups are sequences, dropless (C = T new tokens per sequence)."""
    mcfg, n = self.config.model, len(self.devices)
    b, t = tokens.shape
    if b % n:
      raise ConfigError(
        f'decode batch {b} does not divide over devices (data x expert)={n} (pad it to a '
        f'multiple of {n}, as mas_jax.decode.Generator does)'
      )
    cap = moe_lib.capacity(t, mcfg.top_k, mcfg.num_experts, mcfg.capacity_factor, dropless=True)
    dtype = jnp.dtype(mcfg.compute_dtype)

    def local_forward(params, cache, tokens, start):
      # tokens: i32[B/n, T], start: i32[B/n] or None; cache: [L, B/n, S, N, H].
      x = params['embed'][tokens].astype(dtype)  # [G, T, D]
      for layer in range(mcfg.num_layers):  # unrolled: a static layer index updates in place
        p = jax.tree.map(lambda a, i=layer: a[i], params['blocks'])
        layer_cache = (cache['k'][layer], cache['v'][layer], start)
        x, _, (k, v) = ep_block(mcfg, x, p, cap, None, 0, layer_cache)
        cache = {
          'k': attn_lib.write_cache(cache['k'], layer, k, start),
          'v': attn_lib.write_cache(cache['v'], layer, v, start),
        }
      return model_lib.head_logits(params, x), cache

    rows = P((DATA_AXIS, EXPERT_AXIS))
    cache_specs = {'k': self.cache_spec(), 'v': self.cache_spec()}
    return jax.shard_map(
      local_forward,
      mesh=self.mesh,
      in_specs=(self.param_specs(params), cache_specs, rows, rows),
      out_specs=(rows, cache_specs),
    )(params, cache, tokens, start)
