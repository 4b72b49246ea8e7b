"""Per-device attention math as pure functions: norm, RoPE, QKV, causal attention, output.

Each function works on whatever slice of heads it is given, so a strategy that holds heads
[h0, h1) of `wq`/`wk`/`wv`/`wo` calls the same code as the single-device model: the output
projection of a head slice is a partial sum over heads ({U_heads}) that the strategy reduces.

Dims: B batch, T sequence, D d_model, N heads (local), H head_dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NORM_EPS = 1e-6


def rms_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
  """RMSNorm in float32 (the variance of bf16 activations is not accurate enough), cast back."""
  x32 = x.astype(jnp.float32)
  # lax.rsqrt rather than 1/sqrt: one op, and the same floats on every strategy.
  normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + _NORM_EPS)
  scale = scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + scale.shape)
  return (normed * scale).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotary position embedding (rotate-half form) of x[B, T, N, H] at positions[T]."""
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [H/2]
  angle = positions.astype(jnp.float32)[:, None] * freq[None, :]  # [T, H/2]
  sin, cos = jnp.sin(angle)[None, :, None, :], jnp.cos(angle)[None, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def qkv_projection(
  x: jax.Array,
  wq: jax.Array,
  wk: jax.Array,
  wv: jax.Array,
  positions: jax.Array,
  rope_base: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Stage 1: projects normed x[B, T, D] onto the given heads; RoPE applied to q and k.

  Args:
    x: normed layer input [B, T, D] in the compute dtype.
    wq, wk, wv: [D, N, H] for the N heads this caller owns.
    positions: [T] token positions.
    rope_base: RoPE base frequency.

  Returns:
    q, k, v: [B, T, N, H].
  """
  dtype = x.dtype
  q = jnp.einsum('BTD,DNH->BTNH', x, wq.astype(dtype))
  k = jnp.einsum('BTD,DNH->BTNH', x, wk.astype(dtype))
  v = jnp.einsum('BTD,DNH->BTNH', x, wv.astype(dtype))
  return rope(q, positions, rope_base), rope(k, positions, rope_base), v


def causal_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, implementation: str | None = None
) -> jax.Array:
  """Stage 2: causal softmax attention per head; q, k, v, output: [B, T, N, H].

  `implementation`: None lets JAX choose, 'cudnn' forces cuDNN flash attention (GPU, bf16/fp16),
  'xla' the plain softmax(QK^T)V.
  """
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)


def output_projection(o: jax.Array, wo: jax.Array) -> jax.Array:
  """Stage 3: o[B, T, N, H] @ wo[N, H, D] -> [B, T, D]; a partial sum if N is a head slice."""
  return jnp.einsum('BTNH,NHD->BTD', o, wo.astype(o.dtype))


def attention(
  x: jax.Array,
  params: dict,
  positions: jax.Array,
  rope_base: float,
  head_mask: jax.Array | None = None,
  implementation: str | None = None,
) -> jax.Array:
  """Multi-head causal self-attention of normed x[B, T, D] -> [B, T, D].

  Args:
    x: normed input [B, T, D] in the compute dtype.
    params: {'wq', 'wk', 'wv': [D, N, H], 'wo': [N, H, D]}.
    positions: [T] token positions.
    rope_base: RoPE base frequency.
    head_mask: optional [N] of 0/1; heads with 0 contribute nothing (padding slots of a strategy
      whose devices hold more head slots than there are heads).
    implementation: see `causal_attention`.
  """
  q, k, v = qkv_projection(x, params['wq'], params['wk'], params['wv'], positions, rope_base)
  o = causal_attention(q, k, v, implementation)  # [B, T, N, H]
  if head_mask is not None:
    o = o * head_mask.astype(o.dtype)[None, None, :, None]
  return output_projection(o, params['wo'])
