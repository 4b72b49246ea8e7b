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

import functools

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
  with jax.named_scope('attention'):
    h = attn_lib.rms_norm(x, p['attn_norm']['scale'])
    x = x + attn_lib.attention(
      h, p['attn'], positions, cfg.rope_base, implementation=cfg.attention_implementation
    )
  cap = moe_lib.capacity(x.shape[1], cfg.top_k, cfg.num_experts, cfg.capacity_factor, cfg.dropless)
  with jax.named_scope('moe'):
    h = attn_lib.rms_norm(x, p['mlp_norm']['scale'])
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
  x, stats = forward_hidden(cfg, params, tokens, dropout_key, group_offset)
  return head_logits(params, x), stats


def forward_hidden(
  cfg: ModelConfig,
  params: dict,
  tokens: jax.Array,
  dropout_key: jax.Array | None = None,
  group_offset: int | jax.Array = 0,
) -> tuple[jax.Array, dict]:
  """The blocks of `forward`: tokens[B, T] -> the last block's output x[B, T, D] (compute dtype,
  before the final norm), stats summed over layers."""
  dtype = jnp.dtype(cfg.compute_dtype)
  with jax.named_scope('embed'):
    x = params['embed'][tokens].astype(dtype)  # [B, T, D]
  keys = layer_keys(dropout_key, cfg.num_layers)

  def body(x, layer):
    p, key = layer
    return block_forward(cfg, p, x, key, group_offset)

  body = remat(body, cfg)

  x, stats = jax.lax.scan(body, x, (params['blocks'], keys))
  stats = jax.tree.map(lambda s: jnp.sum(s, axis=0), stats)
  return x, stats


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


def head_cross_entropy_sum(
  cfg: ModelConfig, params: dict, x: jax.Array, targets: jax.Array
) -> jax.Array:
  """Final norm, output head and cross-entropy sum of x[..., D] (compute dtype) vs targets[...].

  model.loss_chunk = 0: the float32 logits [..., V] are made whole (`head_logits`). C > 0: the
  tokens go through the head C at a time (`chunked_cross_entropy_sum`), so no more than [C, V]
  logits exist at once, in either pass. `params` needs 'final_norm' and 'unembed' only.
  """
  if cfg.loss_chunk == 0:
    return cross_entropy_sum(head_logits(params, x), targets)
  x = attn_lib.rms_norm(x, params['final_norm']['scale'])
  w = _vary_like(params['unembed'].astype(x.dtype), x)
  return chunked_cross_entropy_sum(
    x.reshape(-1, x.shape[-1]), w, targets.reshape(-1), cfg.loss_chunk
  )


def _vary_like(w: jax.Array, x: jax.Array) -> jax.Array:
  """w marked as varying over the manual mesh axes x varies over (inside a shard_map), so the
  custom VJP below returns a gradient of the type w has; the transpose of the mark is the psum
  over those axes that autodiff inserts for a replicated weight. Outside a shard_map: w."""
  axes = tuple(sorted(_varying_axes(x) - _varying_axes(w)))
  return jax.lax.pcast(w, axes, to='varying') if axes else w


def _varying_axes(a: jax.Array) -> set[str]:
  """The manual mesh axes `a` varies over (jax 0.10: manual_axis_type.varying; older: vma)."""
  t = jax.typeof(a)
  manual = getattr(t, 'manual_axis_type', None)
  return set(manual.varying if manual is not None else getattr(t, 'vma', ()))


def _chunks(x: jax.Array, targets: jax.Array, chunk: int):
  """x[N, D], targets[N] -> [K, C, D], [K, C] and valid[K, C]: N padded to K chunks of
  C = min(chunk, N) tokens; padded tokens are invalid and add nothing."""
  n = x.shape[0]
  c = min(chunk, n)
  pad = -n % c
  valid = jnp.arange(n + pad) < n
  x = jnp.pad(x, ((0, pad), (0, 0)))
  targets = jnp.pad(targets, (0, pad))
  return x.reshape(-1, c, x.shape[1]), targets.reshape(-1, c), valid.reshape(-1, c)


def _chunk_logits(x_c: jax.Array, w: jax.Array, t_c: jax.Array, valid_c: jax.Array):
  """One chunk: logits[C, V] float32, their logsumexp[C] and the chunk's cross-entropy sum."""
  # The einsum outputs the compute dtype, cast after, as in `head_logits`.
  logits = jnp.einsum('CD,DV->CV', x_c, w).astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)  # [C]
  picked = jnp.take_along_axis(logits, t_c[:, None], axis=-1)[:, 0]  # [C]
  return logits, lse, jnp.sum(jnp.where(valid_c, lse - picked, 0.0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def chunked_cross_entropy_sum(x: jax.Array, w: jax.Array, targets: jax.Array, chunk: int):
  """sum_n -log softmax(x[n] @ w)[targets[n]] over x[N, D], w[D, V] (both the compute dtype),
  computed `chunk` tokens at a time in a `lax.scan`.

  Equal to `cross_entropy_sum` of the whole logits (float32 from the compute-dtype product). Its
  custom VJP computes the gradients in the forward pass, chunk by chunk: d logits = softmax -
  onehot (float32, cast to the compute dtype as autodiff's transpose of the cast does), dx of
  the chunk and dw accumulated in float32 in the scan's carry. So neither pass keeps [N, V]
  logits and the head's matmul is not recomputed; the backward only scales the saved dx[N, D]
  and dw[D, V] by the loss's cotangent. The forward without differentiation (evaluation) runs
  the scan without the gradient matmuls.
  """
  xs, ts, valid = _chunks(x, targets, chunk)

  def body(total, inputs):
    return total + _chunk_logits(inputs[0], w, inputs[1], inputs[2])[2], None

  zero = jnp.zeros((), jnp.float32)
  return jax.lax.scan(body, _vary_like(zero, x), (xs, ts, valid))[0]


def _chunked_ce_fwd(x, w, targets, chunk):
  n, d = x.shape
  xs, ts, valid = _chunks(x, targets, chunk)

  def body(carry, inputs):
    total, dw = carry
    x_c, t_c, valid_c = inputs
    logits, lse, ce = _chunk_logits(x_c, w, t_c, valid_c)
    onehot = jax.nn.one_hot(t_c, logits.shape[-1], dtype=jnp.float32)
    d_logits = (jnp.exp(logits - lse[:, None]) - onehot) * valid_c[:, None]  # [C, V] float32
    d_logits = d_logits.astype(x.dtype)
    dx_c = jnp.einsum('CV,DV->CD', d_logits, w)  # [C, D]
    dw = dw + jnp.einsum('CD,CV->DV', x_c, d_logits, preferred_element_type=jnp.float32)
    return (total + ce, dw), dx_c

  init = (jnp.zeros((), jnp.float32), jnp.zeros(w.shape, jnp.float32))
  init = jax.tree.map(lambda a: _vary_like(a, x), init)
  (total, dw), dxs = jax.lax.scan(body, init, (xs, ts, valid))
  return total, (dxs.reshape(-1, d)[:n], dw, jnp.zeros((0,), w.dtype))


def _chunked_ce_bwd(chunk, residuals, g):
  del chunk
  dx, dw, w_dtype = residuals
  # g: the cotangent of the sum (1 / tokens for the mean loss).
  return (
    (g * dx.astype(jnp.float32)).astype(dx.dtype),
    (g * dw).astype(w_dtype.dtype),
    None,
  )


chunked_cross_entropy_sum.defvjp(_chunked_ce_fwd, _chunked_ce_bwd)


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
  x, stats = forward_hidden(cfg, params, inputs, dropout_key, group_offset)
  with jax.named_scope('head'):
    return head_cross_entropy_sum(cfg, params, x, targets), stats


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
