"""The MoE transformer in Flax NNX; run on one device it is the oracle of every strategy.

Decoder-only: token embedding -> L pre-norm blocks (causal multi-head attention, then an MoE FFN
in every layer, as in the seed) -> final RMSNorm -> untied output head. The blocks are created
with `nnx.vmap`, so every block parameter carries a leading layer axis [L, ...] and the forward
pass is one `lax.scan` over layers (one compiled block, whatever the depth). Modules only own
parameters; the math is in `mas_jax.layers`, shared with the strategies.

Parameters are float32; matmuls and activations run in `ModelConfig.compute_dtype`.

Example:
  model = Transformer(model_config, rngs=nnx.Rngs(0))
  logits, stats = model(tokens)                   # tokens [B, T] int32
  loss, metrics = loss_fn(model_config, nnx.to_pure_dict(nnx.state(model, nnx.Param)), batch)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mas_jax.config import ModelConfig
from mas_jax.layers import attention as attn_lib
from mas_jax.layers import moe as moe_lib


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int) -> nnx.Param:
  return nnx.Param(jax.random.normal(rngs.params(), shape, jnp.float32) / fan_in**0.5)


class Attention(nnx.Module):
  """Causal multi-head self-attention with RoPE; no biases."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, n, h = cfg.d_model, cfg.num_heads, cfg.head_dim
    self.wq = _normal(rngs, (d, n, h), d)  # 'BTD,DNH->BTNH'
    self.wk = _normal(rngs, (d, n, h), d)
    self.wv = _normal(rngs, (d, n, h), d)
    self.wo = _normal(rngs, (n, h, d), n * h)  # 'BTNH,NHD->BTD'


class MoE(nnx.Module):
  """Softmax top-k router and `num_experts` GELU FFN experts d_model -> expert_hidden -> d_model."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, e, f = cfg.d_model, cfg.num_experts, cfg.expert_hidden
    self.router = _normal(rngs, (d, e), d)  # 'GSD,DE->GSE'
    self.w_in = _normal(rngs, (e, d, f), d)  # 'GECD,EDF->GECF'
    self.w_out = _normal(rngs, (e, f, d), f)  # 'GECF,EFD->GECD'


class RMSNorm(nnx.Module):
  def __init__(self, dim: int):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))


class Block(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then + moe(norm(.))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model)
    self.moe = MoE(cfg, rngs=rngs)


class Transformer(nnx.Module):
  """Decoder-only MoE transformer; `__call__(tokens)` returns logits and routing statistics."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Param(
      jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.d_model), jnp.float32)
    )

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs: nnx.Rngs) -> Block:
      return Block(cfg, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = RMSNorm(cfg.d_model)
    self.unembed = _normal(rngs, (cfg.d_model, cfg.vocab_size), cfg.d_model)

  def __call__(self, tokens: jax.Array, dropout_key: jax.Array | None = None):
    """tokens[B, T] -> (logits[B, T, V] float32, stats summed over layers; see layers/moe.py)."""
    return forward(self.cfg, nnx.to_pure_dict(nnx.state(self, nnx.Param)), tokens, dropout_key)


# ---------------------------------------------------------------------------------------------
# Pure functions over the parameter dict (the layout of `nnx.state(model, nnx.Param)`).
# ---------------------------------------------------------------------------------------------


def block_forward(
  cfg: ModelConfig,
  p: dict,
  x: jax.Array,
  dropout_key: jax.Array | None,
  group_offset: int | jax.Array = 0,
) -> tuple[jax.Array, dict]:
  """One block on x[B, T, D] (compute dtype) with one layer's parameters p (no layer axis)."""
  positions = jnp.arange(x.shape[1])
  h = attn_lib.rms_norm(x, p['attn_norm']['scale'])
  x = x + attn_lib.attention(
    h, p['attn'], positions, cfg.rope_base, implementation=cfg.attention_implementation
  )
  h = attn_lib.rms_norm(x, p['mlp_norm']['scale'])
  cap = moe_lib.capacity(x.shape[1], cfg.top_k, cfg.num_experts, cfg.capacity_factor, cfg.dropless)
  y, stats = moe_lib.moe_ffn(
    h,
    p['moe'],
    top_k=cfg.top_k,
    cap=cap,
    activation=cfg.activation,
    dropout_rate=cfg.expert_dropout,
    dropout_key=dropout_key,
    group_offset=group_offset,
    impl=moe_lib.resolve_expert_impl(cfg.expert_impl, cfg.dropless, cfg.expert_dropout),
  )
  return x + y, stats


def remat(fn, cfg: ModelConfig):
  """fn (one layer's computation) rematerialised in the backward pass as `cfg.remat` says."""
  if cfg.remat == 'none':
    return fn
  policy = {'full': None, 'save_dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
  return jax.checkpoint(fn, policy=policy[cfg.remat])


def layer_keys(dropout_key: jax.Array | None, num_layers: int) -> jax.Array | None:
  """One dropout key per layer: fold_in(key, layer), the same on every strategy."""
  if dropout_key is None:
    return None
  return jax.vmap(lambda i: jax.random.fold_in(dropout_key, i))(jnp.arange(num_layers))


def forward(
  cfg: ModelConfig,
  params: dict,
  tokens: jax.Array,
  dropout_key: jax.Array | None = None,
  group_offset: int | jax.Array = 0,
) -> tuple[jax.Array, dict]:
  """Full model: tokens[B, T] -> logits[B, T, V] float32, stats summed over layers.

  `group_offset` is the global index of tokens[0] in the batch (for the expert dropout mask), so
  a data shard of the batch draws the same dropout bits as the whole batch does.
  """
  dtype = jnp.dtype(cfg.compute_dtype)
  x = params['embed'][tokens].astype(dtype)  # [B, T, D]
  keys = layer_keys(dropout_key, cfg.num_layers)

  def body(x, layer):
    p, key = layer
    return block_forward(cfg, p, x, key, group_offset)

  body = remat(body, cfg)

  x, stats = jax.lax.scan(body, x, (params['blocks'], keys))
  stats = jax.tree.map(lambda s: jnp.sum(s, axis=0), stats)
  x = attn_lib.rms_norm(x, params['final_norm']['scale'])
  logits = jnp.einsum('BTD,DV->BTV', x, params['unembed'].astype(dtype)).astype(jnp.float32)
  return logits, stats


# ---------------------------------------------------------------------------------------------
# Generation: the same blocks with a KV cache (see mas_jax/decode.py for the loop).
# ---------------------------------------------------------------------------------------------


def init_cache(cfg: ModelConfig, batch: int, length: int, heads: int | None = None) -> dict:
  """An empty KV cache {'k', 'v'}: [L, B, S, N, H] in the compute dtype (N = `heads` slots)."""
  shape = (cfg.num_layers, batch, length, heads or cfg.num_heads, cfg.head_dim)
  dtype = jnp.dtype(cfg.compute_dtype)
  return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}


def decode_moe(cfg: ModelConfig, p: dict, h: jax.Array) -> jax.Array:
  """The MoE of generation: dropless, no dropout, on normed h[B, T, D] (groups = sequences).

  Dropless because a capacity limit would make a token's output depend on later tokens of its
  sequence, which decoding has not seen; every token's output is then its own.
  """
  impl = moe_lib.resolve_expert_impl(cfg.expert_impl, dropless=True)
  y, _ = moe_lib.moe_ffn(
    h, p, top_k=cfg.top_k, cap=h.shape[1], activation=cfg.activation, impl=impl
  )
  return y


def block_cached(
  cfg: ModelConfig, p: dict, x: jax.Array, cache: dict, layer: int, start: jax.Array | None
) -> tuple[jax.Array, dict]:
  """One block on the new tokens x[B, T, D] with the KV cache; returns x and the updated cache."""
  h = attn_lib.rms_norm(x, p['attn_norm']['scale'])
  out, k, v = attn_lib.attention_cached(
    h, p['attn'], cache['k'][layer], cache['v'][layer], start, cfg.rope_base
  )
  cache = {
    'k': attn_lib.write_cache(cache['k'], layer, k, start),
    'v': attn_lib.write_cache(cache['v'], layer, v, start),
  }
  x = x + out
  return x + decode_moe(cfg, p['moe'], attn_lib.rms_norm(x, p['mlp_norm']['scale'])), cache


def head_logits(params: dict, x: jax.Array) -> jax.Array:
  """Final norm and output head: x[..., D] -> float32 logits [..., V]."""
  x = attn_lib.rms_norm(x, params['final_norm']['scale'])
  return jnp.einsum('...D,DV->...V', x, params['unembed'].astype(x.dtype)).astype(jnp.float32)


def forward_cached(
  cfg: ModelConfig, params: dict, cache: dict, tokens: jax.Array, start: jax.Array | None
) -> tuple[jax.Array, dict]:
  """Prefill (start=None: tokens[B, T] from position 0) or decode (start[B]) with a KV cache.

  Returns logits[B, T, V] float32 and the cache with the new tokens' keys and values written.
  With dropless routing, the logits equal `forward` over the whole sequence at the same positions.
  Layers are unrolled (a static layer index keeps every cache update in place).
  """
  x = params['embed'][tokens].astype(jnp.dtype(cfg.compute_dtype))  # [B, T, D]
  for layer in range(cfg.num_layers):
    p = jax.tree.map(lambda a, i=layer: a[i], params['blocks'])
    x, cache = block_cached(cfg, p, x, cache, layer, start)
  return head_logits(params, x), cache


def cross_entropy_sum(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Sum over tokens of -log softmax(logits)[target]; logits float32 [..., V]."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def finalize_loss(
  cfg: ModelConfig, ce_sum: jax.Array, stats: dict, batch_size: int, seq_len: int
) -> tuple[jax.Array, dict]:
  """Turns global sums into the loss and metrics; every strategy ends with this.

  loss = mean token cross entropy + aux_loss_coef * aux + z_loss_coef * z, where aux is the
  Switch loss averaged over sequences and layers and z the router z-loss averaged over tokens
  and layers.

  Args:
    cfg: model config.
    ce_sum: cross entropy summed over all tokens of the global batch.
    stats: routing statistics summed over the global batch and all layers.
    batch_size, seq_len: global batch shape.
  """
  tokens = batch_size * seq_len
  layers = cfg.num_layers
  ce = ce_sum / tokens
  aux = stats['aux_loss_sum'] / (batch_size * layers)
  z = stats['z_loss_sum'] / (tokens * layers)
  loss = ce + cfg.aux_loss_coef * aux + cfg.z_loss_coef * z
  metrics = {
    'loss': loss,
    'ce_loss': ce,
    'aux_loss': aux,
    'z_loss': z,
    'dropped_token_fraction': stats['dropped'] / (tokens * cfg.top_k * layers),
    'expert_load': stats['expert_counts'] / (tokens * cfg.top_k * layers),  # [E]
  }
  return loss, metrics


def loss_sums(
  cfg: ModelConfig,
  params: dict,
  batch: jax.Array,
  dropout_key: jax.Array | None = None,
  group_offset: int | jax.Array = 0,
) -> tuple[jax.Array, dict]:
  """Cross-entropy sum and routing stats of a packed batch[B, T + 1] (or a shard of one)."""
  inputs, targets = batch[:, :-1], batch[:, 1:]
  logits, stats = forward(cfg, params, inputs, dropout_key, group_offset)
  return cross_entropy_sum(logits, targets), stats


def loss_fn(
  cfg: ModelConfig, params: dict, batch: jax.Array, dropout_key: jax.Array | None = None
) -> tuple[jax.Array, dict]:
  """Reference loss of a packed batch[B, T + 1] (inputs batch[:, :-1], targets batch[:, 1:])."""
  ce_sum, stats = loss_sums(cfg, params, batch, dropout_key)
  return finalize_loss(cfg, ce_sum, stats, batch.shape[0], batch.shape[1] - 1)


def init_params(config) -> dict:
  """Parameters of the NNX model of `config.model` (seeded by `config.seed`) as a plain nested
  dict: the reference layout every strategy converts from."""
  model = Transformer(config.model, rngs=nnx.Rngs(params=config.seed))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))
