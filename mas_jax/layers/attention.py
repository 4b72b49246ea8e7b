"""Per-device attention math as pure functions: norm, RoPE, QKV, causal attention, output.

Each function works on whatever slice of heads it is given, so a strategy that holds heads
[h0, h1) of `wq`/`wk`/`wv`/`wo` calls the same code as the single-device model: the output
projection of a head slice is a partial sum over heads ({U_heads}) that the strategy reduces.

Dims: B batch, T sequence, D d_model, N heads (local), H head_dim.
"""

from __future__ import annotations

import functools
import math

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
  """Rotary position embedding (rotate-half form) of x[B, T, N, H] at positions[T] or [B, T].

  Per-sequence positions [B, T] are what decoding needs: each sequence of a batch of prompts of
  different lengths sits at its own position.
  """
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [H/2]
  positions = positions.reshape((-1, positions.shape[-1]))  # [1 or B, T]
  angle = positions.astype(jnp.float32)[:, :, None] * freq[None, None, :]  # [1|B, T, H/2]
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
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
    positions: [T] token positions, or [B, T] per sequence.
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

  `implementation`: 'cudnn' forces cuDNN flash attention (GPU, bf16/fp16). 'xla' and None
  (model.attention_impl='auto') run `blockwise_causal_attention`, which holds no [T, T] scores.
  'auto' is the XLA path on every platform, as before: given None, JAX 0.10's
  `jax.nn.dot_product_attention` never picks cuDNN (it runs its dense XLA attention).
  """
  if implementation == 'cudnn':
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='cudnn')
  if implementation not in (None, 'xla'):
    raise ValueError(f"implementation={implementation!r} is not one of None, 'xla', 'cudnn'")
  return blockwise_causal_attention(q, k, v)


def _dense_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """The plain softmax(QK^T)V, holding [B, N, T, T] scores: what the tests compare against."""
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='xla')


# ---------------------------------------------------------------------------------------------
# Blockwise (flash-style) causal attention.

_MAX_BLOCK = 512


def attention_block_size(t: int) -> int:
  """Query and key block of a sequence of t tokens: the fewest blocks of at most 512, of equal
  size; t is padded up to a multiple of it (by fewer rows than there are blocks)."""
  n_blocks = -(-t // _MAX_BLOCK)
  return -(-t // n_blocks)


def blockwise_causal_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, block: int | None = None
) -> jax.Array:
  """Causal softmax attention of q, k, v [B, T, N, H] in [block, block] tiles, online softmax.

  The forward walks the key blocks of each query block with a running max and sum (float32,
  whatever the input dtype), the FlashAttention-2 way. Key blocks wholly above the diagonal are
  skipped (the loop over key blocks stops at the diagonal block, which the causal mask cuts). The
  backward (`jax.custom_vjp`) keeps only q, k, v, the output and each row's logsumexp, and
  recomputes each tile's probabilities: no [T, T] array is live in either pass, only tiles of
  [B, N, block, block].

  A T that is not a multiple of `block` is padded with zero rows at the end: a padded key sits
  after every real query, so the causal mask already hides it, and padded queries are sliced off
  (their output cotangent is zero, so they add nothing to the gradients).

  Args:
    q, k, v: [B, T, N, H], one dtype.
    block: tile size; None: `attention_block_size(T)` (T itself up to 512).

  Returns:
    [B, T, N, H] in q's dtype.
  """
  t = q.shape[1]
  block = block or attention_block_size(t)
  padded = -(-t // block) * block
  if padded != t:
    rows = ((0, 0), (0, padded - t), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, rows) for x in (q, k, v))
  return _flash(q, k, v, block)[:, :t]


def _rows(x: jax.Array, i: jax.Array, block: int, axis: int = 1) -> jax.Array:
  """Block i (rows i * block ..) of x along `axis`."""
  return jax.lax.dynamic_slice_in_dim(x, i * block, block, axis=axis)


def _tile_scores(q_i: jax.Array, k_j: jax.Array, i: jax.Array, j: jax.Array) -> jax.Array:
  """Scaled scores [B, N, Tb, Sb] in float32 of query block i against key block j, -inf where
  the key comes after the query."""
  block = q_i.shape[1]
  scale = 1.0 / math.sqrt(q_i.shape[-1])  # as jax.nn.dot_product_attention scales
  s = jnp.einsum('BTNH,BSNH->BNTS', q_i, k_j, preferred_element_type=jnp.float32) * scale
  causal = (i * block + jnp.arange(block))[:, None] >= (j * block + jnp.arange(block))[None, :]
  return jnp.where(causal[None, None], s, -jnp.inf)


def _flash_forward(
  q: jax.Array, k: jax.Array, v: jax.Array, block: int
) -> tuple[jax.Array, jax.Array]:
  """Output [B, T, N, H] (q's dtype) and row logsumexp [B, N, T] (float32); T a block multiple."""
  b, t, n, h = q.shape
  f32 = jnp.float32

  def query_block(i):
    q_i = _rows(q, i, block)  # [B, Tb, N, H]

    def key_block(j, carry):
      top, total, acc = carry  # [B, N, Tb], [B, N, Tb], [B, N, Tb, H]
      s = _tile_scores(q_i, _rows(k, j, block), i, j)  # [B, N, Tb, Sb]
      new_top = jnp.maximum(top, jnp.max(s, axis=-1))
      # Key block 0 comes first and every query sees key 0: new_top is finite from the start, and
      # the -inf initial max rescales the zero initial sums by exp(-inf) = 0.
      p = jnp.exp(s - new_top[..., None])
      rescale = jnp.exp(top - new_top)
      total = total * rescale + jnp.sum(p, axis=-1)
      pv = jnp.einsum(
        'BNTS,BSNH->BNTH', p.astype(v.dtype), _rows(v, j, block), preferred_element_type=f32
      )
      return new_top, total, acc * rescale[..., None] + pv

    # Accumulators derived from q_i (not fresh constants) so that inside shard_map they carry
    # the same varying mesh axes as the values the loop adds to them.
    zero = jnp.zeros_like(q_i, f32).transpose(0, 2, 1, 3)  # [B, N, Tb, H]
    init = (zero[..., 0] - jnp.inf, zero[..., 0], zero)
    top, total, acc = jax.lax.fori_loop(0, i + 1, key_block, init)  # key blocks 0 .. i
    o = (acc / total[..., None]).transpose(0, 2, 1, 3).astype(q.dtype)  # [B, Tb, N, H]
    return o, top + jnp.log(total)

  o, lse = jax.lax.map(query_block, jnp.arange(t // block))  # [nb, B, Tb, N, H], [nb, B, N, Tb]
  o = o.transpose(1, 0, 2, 3, 4).reshape(b, t, n, h)
  return o, lse.transpose(1, 2, 0, 3).reshape(b, n, t)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash(q: jax.Array, k: jax.Array, v: jax.Array, block: int) -> jax.Array:
  """Blockwise causal attention of q, k, v [B, T, N, H], T a multiple of block."""
  return _flash_forward(q, k, v, block)[0]


def _flash_fwd(q, k, v, block):
  o, lse = _flash_forward(q, k, v, block)
  return o, (q, k, v, o, lse)


def _flash_bwd(block, residuals, do):
  """FlashAttention-2 backward: per tile P = exp(S - lse), dV += P^T dO, dP = dO V^T,
  dS = P * (dP - rowsum(dO * O)), dQ += dS K, dK += dS^T Q (dS carrying the 1/sqrt(H) scale).

  Outer loop over key blocks j (dK_j, dV_j accumulate in its carry), inner over the query blocks
  i >= j that see it; dQ [B, T, N, H] float32 is carried through both and updated in place.
  """
  q, k, v, o, lse = residuals
  t = q.shape[1]
  f32 = jnp.float32
  scale = 1.0 / math.sqrt(q.shape[-1])
  delta = jnp.einsum('BTNH,BTNH->BNT', do.astype(f32), o.astype(f32))  # rowsum(dO * O)

  def key_block(dq, j):
    k_j, v_j = _rows(k, j, block), _rows(v, j, block)  # [B, Sb, N, H]

    def query_block(i, carry):
      dq, dk_j, dv_j = carry
      q_i, do_i = _rows(q, i, block), _rows(do, i, block)  # [B, Tb, N, H]
      p = jnp.exp(_tile_scores(q_i, k_j, i, j) - _rows(lse, i, block, axis=2)[..., None])
      dv_j = dv_j + jnp.einsum(
        'BNTS,BTNH->BSNH', p.astype(do.dtype), do_i, preferred_element_type=f32
      )
      dp = jnp.einsum('BTNH,BSNH->BNTS', do_i, v_j, preferred_element_type=f32)
      ds = (p * (dp - _rows(delta, i, block, axis=2)[..., None]) * scale).astype(q.dtype)
      dk_j = dk_j + jnp.einsum('BNTS,BTNH->BSNH', ds, q_i, preferred_element_type=f32)
      dq_i = jnp.einsum('BNTS,BSNH->BTNH', ds, k_j, preferred_element_type=f32)
      dq = jax.lax.dynamic_update_slice_in_dim(dq, _rows(dq, i, block) + dq_i, i * block, axis=1)
      return dq, dk_j, dv_j

    zero = jnp.zeros_like(k_j, f32)
    dq, dk_j, dv_j = jax.lax.fori_loop(j, t // block, query_block, (dq, zero, zero))
    return dq, (dk_j, dv_j)

  dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros_like(q, f32), jnp.arange(t // block))
  # [nb, B, Sb, N, H] -> [B, T, N, H]
  unblock = lambda x: x.transpose(1, 0, 2, 3, 4).reshape(q.shape)
  return dq.astype(q.dtype), unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype)


_flash.defvjp(_flash_fwd, _flash_bwd)


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


def cached_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  k_cache: jax.Array | None = None,
  v_cache: jax.Array | None = None,
  cache_len: jax.Array | None = None,
) -> jax.Array:
  """Stage 2 of generation: new queries attend to a KV cache and, causally, to each other.

  Query t of sequence b sees cache entries s < cache_len[b] and new keys u <= t. Decode is T = 1
  (one new token per sequence, at position cache_len[b]); prefill of a prompt from position 0
  passes no cache. Scores and softmax in float32 (with a cache, the weighted sum of values too);
  the result equals `causal_attention` over the concatenated sequence.

  With a cache, its terms are written as multiply + reduce over the cache in its own
  [B, S, N, H] layout (one pass each). Written as einsums (batched matmuls with batch dims B and
  N on either side of S), XLA's GPU compiler chose per shape between that same rewrite and a
  matmul path: on one H100 the decode step of 8 heads at batch 24 ran 2.8x slower that way
  (bench/decode.py, section "variants"; docs/benchmarks/nvidia_h100_80gb_hbm3_decode.md).

  Dense, not blockwise: it holds the float32 scores of the T new queries against all S + T keys,
  small for decode (T = 1). A prefill of a long prompt does hold its [B, N, T, T] scores
  (inference only: nothing is kept for a backward).

  Args:
    q, k, v: the new tokens' queries, keys and values [B, T, N, H].
    k_cache, v_cache: [B, S, N, H] (S the cache length), or None.
    cache_len: [B] int32, filled entries of each sequence's cache; needed with a cache.

  Returns:
    [B, T, N, H] in q's dtype.
  """
  t = q.shape[1]
  f32 = jnp.float32
  causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]  # [T, U]
  if k_cache is None:  # prefill: batched matmuls over the new tokens only
    scores = jnp.einsum('BTNH,BUNH->BNTU', q, k, preferred_element_type=f32) * q.shape[-1] ** -0.5
    probs = jax.nn.softmax(jnp.where(causal[None, None], scores, -jnp.inf), axis=-1)
    return jnp.einsum('BNTU,BUNH->BTNH', probs.astype(q.dtype), v)
  q32 = q.astype(f32) * q.shape[-1] ** -0.5
  new = jnp.einsum('BTNH,BUNH->BTUN', q32, k.astype(f32))
  new = jnp.where(causal[None, :, :, None], new, -jnp.inf)  # [B, T, U, N]
  past = jnp.sum(q32[:, :, None] * k_cache[:, None].astype(f32), axis=-1)  # [B, T, S, N]
  # One pass over the keys: without the barrier XLA may fuse this reduce into each of its
  # consumers (max and exp below) and read the cache again for each (one H100, 32 heads at batch
  # 256: 6 passes over the keys of 4 layers, 4041 vs 3297 us per layer; bench/decode.py
  # variants 'unpinned' vs 'library', docs/benchmarks/nvidia_h100_80gb_hbm3_decode.md).
  past = jax.lax.optimization_barrier(past)
  filled = jnp.arange(k_cache.shape[1])[None, :] < cache_len[:, None]  # [B, S]
  past = jnp.where(filled[:, None, :, None], past, -jnp.inf)
  top = jnp.maximum(jnp.max(new, axis=2), jnp.max(past, axis=2))[:, :, None]  # [B, T, 1, N]
  p_new, p_past = jnp.exp(new - top), jnp.exp(past - top)  # masked entries: exactly 0
  total = jnp.sum(p_new, axis=2) + jnp.sum(p_past, axis=2)  # [B, T, N]
  out = jnp.einsum('BTUN,BUNH->BTNH', p_new, v.astype(f32))
  out = out + jnp.sum(p_past[..., None] * v_cache[:, None].astype(f32), axis=2)
  return (out / total[..., None]).astype(q.dtype)


def write_cache(cache: jax.Array, layer: int, new: jax.Array, start: jax.Array | None) -> jax.Array:
  """cache[L, B, S, N, H] with new[B, T, N, H] written into `layer` at start[b] .. start[b] + T - 1.

  `start=None` writes at position 0 of every sequence (prefill). One in-place update of the
  whole cache (no per-layer copy). Positions past S are the caller's error, checked before any
  work (`mas_jax.decode`).
  """
  new = new.astype(cache.dtype)
  if start is None:
    return jax.lax.dynamic_update_slice(cache, new[None], (layer, 0, 0, 0, 0))
  write = lambda c, x, s: jax.lax.dynamic_update_slice(c, x[None], (layer, s, 0, 0))
  return jax.vmap(write, in_axes=(1, 0, 0), out_axes=1)(cache, new, start)


def attention_cached(
  x: jax.Array,
  params: dict,
  k_cache: jax.Array,
  v_cache: jax.Array,
  start: jax.Array | None,
  rope_base: float,
  head_mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Generation's attention of normed x[B, T, D] (the new tokens) against one layer's cache.

  Args:
    x: normed new tokens [B, T, D] in the compute dtype.
    params: {'wq', 'wk', 'wv': [D, N, H], 'wo': [N, H, D]} for the N heads the caller owns.
    k_cache, v_cache: this layer's cache [B, S, N, H] for the same heads.
    start: [B] position of each sequence's first new token (= its filled cache length), or
      None for prefill from position 0 (the cache is not read).
    rope_base: RoPE base frequency.
    head_mask: as in `attention`.

  Returns:
    out [B, T, D] (a partial sum over heads if N is a slice), and the new keys and values
    [B, T, N, H] to write into the cache at `start`.
  """
  positions = jnp.arange(x.shape[1])[None, :]
  if start is not None:
    positions = start[:, None] + positions  # [B, T]
  q, k, v = qkv_projection(x, params['wq'], params['wk'], params['wv'], positions, rope_base)
  if start is None:
    o = cached_attention(q, k, v)
  else:
    o = cached_attention(q, k, v, k_cache.astype(q.dtype), v_cache.astype(q.dtype), start)
  if head_mask is not None:
    o = o * head_mask.astype(o.dtype)[None, None, :, None]
  out = output_projection(o, params['wo'])
  if start is None:
    return out, k, v
  # The caller writes k and v into the cache this call has just read. Tying them to the output
  # orders that in-place write after the reads: otherwise XLA may schedule the write first and
  # keep the old values in a copy of the whole cache (one H100, 8 heads at batch 256: 2764 us per
  # layer without the barrier, 1039 with; docs/benchmarks/*_decode_before_barriers.md and
  # *_decode.md).
  return jax.lax.optimization_barrier((out, k, v))
