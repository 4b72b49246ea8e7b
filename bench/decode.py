"""Decode benchmark on one device: each MA-Separation role's decode step, and the whole model's.

Synthetic bf16 weights at the seed's shapes (configs/paper.py: d_model 4096, 32 heads of 128,
16 experts, top-2, expert hidden 16384, GELU), timed through mas-jax's own layer functions:
  1. ceilings: an HBM copy (bytes read + written), a read-only reduction and a bf16 matmul;
  2. attention device: RMSNorm + `attention_cached` on k heads + `write_cache` of the new keys and
     values, for the model's 4 layers in one call (a static layer index into one cache
     [L, B, S, k, 128], as `model.forward_cached` does), per layer; k heads x batch x context;
  3. expert device: `moe.grouped_expert_ffn` of E local experts on the token-expert pairs a top-2
     router over 16 experts sends them from `batch` random tokens (dropless; the decode path's
     grouped kernel, `resolve_expert_impl('auto', dropless=True)`), XLA's `ragged_dot`, and the
     capacity einsum (`moe.expert_ffn`) in two forms for comparison;
  4. the whole reference decode step (`model.forward_cached` + argmax, jitted, cache donated) of
     the full 4-layer seed model (9.1 B parameters, bf16) with a random cache of context 2048:
     TPOT and tokens/s per batch.
Each role is reported as achieved HBM GB/s: the bytes it must move (weights read, filled KV
cache read, new keys and values written; expert weights of the experts some pair reaches) over
its time, against the copy ceiling of the same run. Steps are timed as chains of calls dispatched
without waiting (`common.time_chain`), rotating over input sets where one set fits in L2.
Writes docs/benchmarks/<device>_decode.{json,md} and the planner's decode calibration
docs/benchmarks/<device>_decode_calibration.json (schema: mas_jax/perf/calibration.py).

  python bench/decode.py                                  # on a GPU, everything
  python bench/decode.py --sections=ceilings,variants     # a subset (see --help)
  python bench/decode.py --smoke                          # tiny shapes on CPU (test suite)
  python bench/decode.py --render_only --merge=RESULT.json --yardstick=0:LOG   # tables only
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# JAX takes 75% of the GPU by default; batch 256 holds 52.6 GB of weights and cache, and XLA's
# autotuner wants room for a 17 GB kernel input beside the weights.
os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.95')

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs import paper  # noqa: E402
from mas_jax import config as config_lib  # noqa: E402
from mas_jax import model as model_lib  # noqa: E402
from mas_jax.layers import attention as attn_lib  # noqa: E402
from mas_jax.layers import moe as moe_lib  # noqa: E402

BF16 = jnp.bfloat16
T0 = time.perf_counter()
SECTIONS = ('ceilings', 'variants', 'attention', 'experts', 'gmm', 'model')

GPU = {
  'smoke': False,
  'copy_elems': 1 << 28,
  'matmul_n': 8192,
  'd_model': 4096,
  'head_dim': 128,
  'num_experts': 16,
  'top_k': 2,
  'expert_hidden': 16384,
  'layers': 4,
  'batches': [1, 8, 24, 64, 256],
  # Every head count a 16-device plan can give an attention device or a TP rank
  # (ceil(32 / n) for n = 1..15, and 32 / tp), at context 2048; the five at 8192.
  'heads': {2048: [1, 2, 3, 4, 5, 6, 7, 8, 11, 16, 32], 8192: [1, 2, 3, 8, 32]},
  'cache_budget_bytes': 36e9,  # KV cache of one attention case (k and v, all its layers)
  'l2_rotation_bytes': 256e6,  # rotate input sets until a rotation moves this much
  'local_experts': [1, 2, 3, 4, 6, 8, 16],
  'expert_impls': ['auto', 'ragged_dot'],
  'einsum_experts': [1, 4, 16],  # the einsum forms for these local-expert counts only
  # TP ranks hold 1/tp of every expert's hidden width: tp16, tp8 (TP8 x PP2), tp4.
  'tp_slices': [{'local_experts': 16, 'expert_hidden': h} for h in (1024, 2048, 4096)],
  # (heads, batch) at context 2048
  'variant_cases': [(3, 24), (3, 256), (8, 24), (8, 256), (32, 24), (32, 256)],
  'dump_cases': [(8, 256)],  # compiled HLO of these variant cases, with --dump_hlo
  # (model.expert_impl, batch): 'auto' is the decode path (the grouped kernel); 'einsum' runs
  # decode_moe's capacity einsum (capacity 1 per sequence), for comparison.
  'model_cases': [('auto', b) for b in (1, 8, 24, 64, 256)] + [('einsum', 24), ('einsum', 256)],
  # The grouped kernel's two matmuls apart: (local experts, batch) routed as above.
  'gmm_cases': [(1, 24), (4, 24), (16, 24), (4, 256)],
  'model_context': 2048,
  'vocab_size': 32000,
  'target_s': 0.05,  # chain length: about this many seconds per timed repeat
  'repeats': 5,
}
SMOKE = {
  **GPU,
  'smoke': True,
  'copy_elems': 1 << 12,
  'matmul_n': 64,
  'd_model': 64,
  'head_dim': 16,
  'num_experts': 4,
  'expert_hidden': 128,
  'layers': 2,
  'batches': [1, 4],
  'heads': {16: [2], 32: [1]},
  'cache_budget_bytes': 1e8,
  'l2_rotation_bytes': 0,
  'local_experts': [1, 4],
  'expert_impls': ['auto'],
  'einsum_experts': [1],
  'tp_slices': [{'local_experts': 4, 'expert_hidden': 32}],
  'variant_cases': [(2, 4)],
  'dump_cases': [(2, 4)],
  'model_cases': [('auto', 2)],
  'gmm_cases': [(1, 4)],
  'model_context': 16,
  'vocab_size': 256,
  'target_s': 0.0,
  'repeats': 1,
}


_PRIMES = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1, 0xD3A2646C)


def _mix(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def random_array(seed, shape: tuple[int, ...], fan_in: float = 1.0, dtype=BF16) -> jax.Array:
  """Uniform values of variance 1 / fan_in from a hash of each element's index and `seed`.

  One elementwise kernel with no temporaries (threefry's random bits of a 17 GB cache would
  need twice its size), compiled in milliseconds; plenty random for timing.
  """
  h = _mix(jnp.asarray(seed, jnp.uint32) * jnp.uint32(_PRIMES[0]) + jnp.uint32(1))
  for dim in range(len(shape)):
    h = _mix(h ^ (jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * jnp.uint32(_PRIMES[dim])))
  u = (h >> 8).astype(jnp.float32) * 2.0**-24 - 0.5  # [-0.5, 0.5)
  return (u * (12.0 / fan_in) ** 0.5).astype(dtype)


def _chain_time(s: dict, step, states: list) -> tuple[float, list]:
  """Seconds per call of `step` (see common.time_chain), with a chain of about s['target_s']."""
  t0, states = common.time_chain(step, states, len(states), repeats=1)
  calls = len(states) * max(1, min(200, math.ceil(s['target_s'] / t0 / len(states))))
  return common.time_chain(step, states, calls, repeats=s['repeats'], warmup=0)


# ---------------------------------------------------------------------------------------------
# 1. Ceilings.


def ceilings(s: dict) -> dict:
  """HBM copy (read + write), read-only reduction and bf16 matmul rates of this device."""
  n = s['matmul_n']
  a, b = random_array(1, (n, n)), random_array(2, (n, n))
  mm = jax.jit(lambda x, y: (x @ y) * (1 / n**0.5))  # chained x <- x @ y / sqrt(n): stays ~N(0, 1)
  # Long warm-up: the first seconds of GPU work run below full clocks.
  t_mm, _ = common.time_chain(lambda x: mm(x, b), [a], 20, warmup=50)
  x = random_array(3, (s['copy_elems'] * 2,))
  total = jax.jit(lambda v, c: jnp.sum(v, dtype=jnp.float32) + c)
  t_read, _ = common.time_chain(lambda c: total(x, c), [jnp.zeros((), jnp.float32)], 20)
  return {
    'hbm_copy_gbps': common.hbm_copy_gbps(s['copy_elems']),
    'hbm_read_gbps': x.size * 2 / t_read / 1e9,
    'matmul_bf16_tflops': 2 * n**3 / t_mm / 1e12,
    'matmul_n': n,
  }


# ---------------------------------------------------------------------------------------------
# 2. The attention device.


def attention_params(s: dict, layers: int, heads: int, seed: int) -> dict:
  """One attention device's weights for `heads` heads of each layer, stacked [L, ...], bf16."""
  d, hd = s['d_model'], s['head_dim']
  attn = {n: random_array(seed + i, (layers, d, heads, hd), d) for i, n in enumerate('qkv')}
  attn = {f'w{n}': w for n, w in attn.items()}
  attn['wo'] = random_array(seed + 3, (layers, heads, hd, d), heads * hd)
  return {'attn_norm': {'scale': jnp.ones((layers, d), BF16)}, 'attn': attn}


def attention_role_step(params: dict, cache: dict, x: jax.Array, start: jax.Array, rope_base):
  """The attention device's part of every layer, as `model.block_cached` runs it: norm,
  `attention_cached` on this device's heads, `write_cache`; x[B, 1, D] carries the output into
  the next layer (as the experts' output would)."""
  for layer in range(cache['k'].shape[0]):
    p = jax.tree.map(lambda a, i=layer: a[i], params)
    h = attn_lib.rms_norm(x, p['attn_norm']['scale'])
    out, k, v = attn_lib.attention_cached(
      h, p['attn'], cache['k'][layer], cache['v'][layer], start, rope_base
    )
    cache = {
      'k': attn_lib.write_cache(cache['k'], layer, k, start),
      'v': attn_lib.write_cache(cache['v'], layer, v, start),
    }
    x = x + out
  return x, cache


def attention_bytes(s: dict, heads: int, batch: int, context: int) -> float:
  """Bytes one layer's attention step must move: its heads' weights (and norm scale) read, the
  filled cache (context - 1 entries per sequence) read, the new keys and values written, and
  the layer's input read and output written."""
  d, hd = s['d_model'], s['head_dim']
  weights = 4 * d * heads * hd + d
  kv_read = 2 * batch * (context - 1) * heads * hd
  kv_write = 2 * batch * heads * hd
  return 2.0 * (weights + kv_read + kv_write + 2 * batch * d)


def _attention_setup(s: dict, heads: int, batch: int, context: int):
  """(layers, rotation) of one attention case, or None when its cache exceeds the budget."""
  per_layer_cache = 2 * batch * context * heads * s['head_dim'] * 2
  layers = min(s['layers'], int(s['cache_budget_bytes'] // per_layer_cache))
  if layers < 1:
    return None
  per_call = layers * attention_bytes(s, heads, batch, context)
  rotation = max(1, min(8, math.ceil(s['l2_rotation_bytes'] / per_call)))
  return layers, rotation


def time_attention(
  s: dict, heads: int, batch: int, context: int, core=None, dump: str | None = None
) -> dict:
  """One attention case: per-layer seconds and achieved GB/s. `core` replaces
  `attn_lib.cached_attention` (same signature) while tracing, to time an alternative."""
  setup = _attention_setup(s, heads, batch, context)
  row = {'heads': heads, 'batch': batch, 'seq': context}
  if setup is None:
    return {**row, 'skipped': f'KV cache over {s["cache_budget_bytes"] / 1e9:.0f} GB'}
  layers, rotation = setup
  d, hd = s['d_model'], s['head_dim']
  start = jnp.full((batch,), context - 1, jnp.int32)  # context - 1 cached keys + the new one

  def state(i):
    seed = 100 * (i + 1)
    shape = (layers, batch, context, heads, hd)
    cache = {'k': random_array(seed, shape), 'v': random_array(seed + 1, shape)}
    x = random_array(seed + 2, (batch, 1, d))
    return attention_params(s, layers, heads, seed + 3), cache, x

  original = attn_lib.cached_attention
  try:
    if core is not None:
      attn_lib.cached_attention = core

    def _step(params, cache, x, start):
      return attention_role_step(params, cache, x, start, 1e4)

    step_jit = jax.jit(_step, donate_argnums=(1,))
    states = [state(i) for i in range(rotation)]
    compiled = step_jit.lower(*states[0], start).compile()
    mem = compiled.memory_analysis()
    if dump:
      with open(dump, 'w') as f:
        f.write(compiled.as_text())
  finally:
    attn_lib.cached_attention = original

  def step(st):
    params, cache, x = st
    x, cache = compiled(params, cache, x, start)
    return params, cache, x

  t, states = _chain_time(s, step, states)
  per_layer = t / layers
  nbytes = attention_bytes(s, heads, batch, context)
  return {
    **row,
    'layers_per_call': layers,
    'rotation': rotation,
    'time_s': per_layer,
    'bytes': nbytes,
    'gbps': nbytes / per_layer / 1e9,
    # The compiled step's temporaries: a copy of the cache would show here.
    'temp_gb': None if mem is None else mem.temp_size_in_bytes / 1e9,
  }


def cached_attention_v0(q, k, v, k_cache=None, v_cache=None, cache_len=None):
  """`cached_attention` as first committed (7d6bf17): einsums over the cache [B, S, N, H]."""
  t = q.shape[1]
  scale = q.shape[-1] ** -0.5
  f32 = jnp.float32
  scores = jnp.einsum('BTNH,BUNH->BNTU', q, k, preferred_element_type=f32) * scale
  causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
  scores = jnp.where(causal[None, None], scores, -jnp.inf)
  if k_cache is not None:
    past = jnp.einsum('BTNH,BSNH->BNTS', q, k_cache, preferred_element_type=f32) * scale
    filled = jnp.arange(k_cache.shape[1])[None, :] < cache_len[:, None]
    past = jnp.where(filled[:, None, None, :], past, -jnp.inf)
    scores = jnp.concatenate([past, scores], axis=-1)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  out = jnp.einsum('BNTU,BUNH->BTNH', probs[..., -t:], v)
  if k_cache is not None:
    out = out + jnp.einsum('BNTS,BSNH->BTNH', probs[..., :-t], v_cache)
  return out


def cached_attention_blockdiag(q, k, v, k_cache=None, v_cache=None, cache_len=None):
  """Candidate: the cache terms as batched matmuls with batch dim B only, over the cache viewed
  as [B, S, N * H] (no re-layout): q is spread block-diagonally over [N, N * H] and the values'
  product [N, N * H] is reduced to its diagonal blocks, N times the FLOPs of the useful ones."""
  if k_cache is None:
    return cached_attention_v0(q, k, v)
  b, t, n, h = q.shape
  s = k_cache.shape[1]
  f32 = jnp.float32
  eye = jnp.eye(n, dtype=q.dtype)
  qbd = (q[:, :, :, None, :] * eye[None, None, :, :, None]).reshape(b, t * n, n * h)
  past = (
    jnp.einsum(
      'BMK,BSK->BMS', qbd, k_cache.reshape(b, s, n * h), preferred_element_type=f32
    ).reshape(b, t, n, s)
    * h**-0.5
  )
  filled = jnp.arange(s)[None, :] < cache_len[:, None]  # [B, S]
  past = jnp.where(filled[:, None, None, :], past, -jnp.inf)  # [B, T, N, S]
  causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
  new = jnp.einsum('BTNH,BUNH->BTNU', q, k, preferred_element_type=f32) * h**-0.5
  new = jnp.where(causal[None, :, None, :], new, -jnp.inf)
  probs = jax.nn.softmax(jnp.concatenate([past, new], axis=-1), axis=-1).astype(q.dtype)
  full = jnp.einsum(
    'BMS,BSK->BMK',
    probs[..., :s].reshape(b, t * n, s),
    v_cache.reshape(b, s, n * h),
    preferred_element_type=f32,
  ).reshape(b, t, n, n, h)
  out = full[:, :, jnp.arange(n), jnp.arange(n)]  # [B, T, N, H]
  out = out + jnp.einsum('BTNU,BUNH->BTNH', probs[..., s:], v, preferred_element_type=f32)
  return out.astype(q.dtype)


_LIBRARY_CACHED_ATTENTION = attn_lib.cached_attention


def cached_attention_unpinned(q, k, v, k_cache=None, v_cache=None, cache_len=None):
  """The library's multiply + reduce without the barrier that keeps the key scores one pass."""
  barrier = jax.lax.optimization_barrier
  try:
    jax.lax.optimization_barrier = lambda x: x
    return _LIBRARY_CACHED_ATTENTION(q, k, v, k_cache, v_cache, cache_len)
  finally:
    jax.lax.optimization_barrier = barrier


VARIANTS = {
  'library': None,  # attn_lib.cached_attention as it is in the tree (multiply + reduce)
  'unpinned': cached_attention_unpinned,
  'einsum_v0': cached_attention_v0,
  'blockdiag': cached_attention_blockdiag,
}


def variant_check(s: dict) -> dict:
  """Max relative error of each variant against `cached_attention_v0` at one small shape."""
  ks = jax.random.split(jax.random.key(5), 5)
  b, t, seq, n, hd = 3, 2, 12, 2, s['head_dim']
  q, k, v = (jax.random.normal(kk, (b, t, n, hd), jnp.float32) for kk in ks[:3])
  kc, vc = (jax.random.normal(kk, (b, seq, n, hd), jnp.float32) for kk in ks[3:])
  lens = jnp.array([0, 5, seq], jnp.int32)
  ref = cached_attention_v0(q, k, v, kc, vc, lens)
  out = {}
  for name, fn in VARIANTS.items():
    got = (fn or attn_lib.cached_attention)(q, k, v, kc, vc, lens)
    out[name] = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
  return out


def variants(s: dict, dump_dir: str | None):
  """Yields the attention step of each VARIANTS entry at s['variant_cases']."""
  for heads, batch in s['variant_cases']:
    context = next(iter(s['heads']))
    for name, fn in VARIANTS.items():
      dump = None
      if dump_dir and (heads, batch) in s['dump_cases']:
        dump = os.path.join(dump_dir, f'attention_{name}_k{heads}_b{batch}.hlo.txt')
      yield {'variant': name, **time_attention(s, heads, batch, context, fn, dump)}


def attention_sweep(s: dict):
  for context, heads_list in s['heads'].items():
    for heads in heads_list:
      for batch in s['batches']:
        yield time_attention(s, heads, batch, context)


# ---------------------------------------------------------------------------------------------
# 3. The expert device.


def routed_pairs(s: dict, batch: int, local: int, seed: int = 0) -> np.ndarray:
  """Local expert ids [n] of the token-expert pairs that a top-2 softmax router over all experts
  sends from `batch` random tokens to a device holding experts 0 .. local - 1 (at least one)."""
  d, e = s['d_model'], s['num_experts']
  keys = jax.random.split(jax.random.key(seed), 2)
  x = jax.random.normal(keys[0], (1, batch, d), jnp.float32)
  w = jax.random.normal(keys[1], (d, e), jnp.float32) / d**0.5
  experts = np.asarray(moe_lib.router(x, w, s['top_k'])['experts']).ravel()
  mine = experts[experts < local]
  return mine if mine.size else np.zeros((1,), experts.dtype)


def time_experts(s: dict, local: int, hidden: int, batch: int, impl: str) -> dict:
  """One expert case. impl: an EXPERT_IMPLS name for `grouped_expert_ffn` ('auto' resolved as
  the dropless decode path does), or 'einsum_seq' ([B, E, 1, D] buffers: every sequence through
  every local expert, as the capacity einsum runs decode with capacity 1 per sequence) or
  'einsum_pad' ([1, E, C, D] with C the largest expert load: dropless padding)."""
  d = s['d_model']
  ids = routed_pairs(s, batch, local)
  pairs, counts = ids.size, np.bincount(ids, minlength=local)
  resolved = moe_lib.resolve_expert_impl(impl, dropless=True) if impl == 'auto' else impl
  w_in = random_array(7, (local, d, hidden), d)
  w_out = random_array(8, (local, hidden, d), hidden)
  if impl.startswith('einsum'):
    shape = (batch, local, 1, d) if impl == 'einsum_seq' else (1, local, int(counts.max()), d)
    x = random_array(9, shape)
    run = jax.jit(lambda x, a, b: moe_lib.expert_ffn(x, a, b, 'gelu'))
    rows = int(np.prod(shape[:3]))
    active = local
  else:
    experts = jnp.asarray(ids, jnp.int32)[None, :, None]  # [1, n, 1]: one choice per pair
    gates = random_array(10, experts.shape, 12.0, jnp.float32) + 0.5  # uniform [0, 1)
    x = random_array(9, (1, pairs, d))
    run = jax.jit(
      lambda x, a, b: moe_lib.grouped_expert_ffn(x, experts, gates, a, b, 'gelu', resolved)
    )
    rows, active = pairs, int(np.count_nonzero(counts))

  # Every call reads the same input (an output fed back would shrink towards zero).
  t, _ = _chain_time(s, lambda _: run(x, w_in, w_out), [x])
  nbytes = 2.0 * (active * 2 * d * hidden + 2 * rows * d)
  return {
    'impl': impl,
    'resolved': resolved,
    'local_experts': local,
    'expert_hidden': hidden,
    'batch': batch,
    'pairs': pairs,
    'active_experts': active,
    'rows_computed': rows,
    'time_s': t,
    'bytes': nbytes,
    'gbps': nbytes / t / 1e9,
    'useful_tflops': pairs * 4 * d * hidden / t / 1e12,
  }


def expert_sweep(s: dict):
  cases = [
    (local, s['expert_hidden'], impl)
    for local in s['local_experts']
    for impl in s['expert_impls']
    + (['einsum_seq', 'einsum_pad'] if local in s['einsum_experts'] else [])
  ]
  cases += [(c['local_experts'], c['expert_hidden'], 'auto') for c in s['tp_slices']]
  for local, hidden, impl in cases:
    for batch in s['batches']:
      try:
        yield time_experts(s, local, hidden, batch, impl)
      except Exception as e:  # noqa: BLE001  (a kernel that rejects the shape: recorded)
        yield {'impl': impl, 'local_experts': local, 'batch': batch, 'error': str(e)[:200]}


def gmm_split(s: dict):
  """The decode path's grouped kernel, its two matmuls timed apart (w_in widens 4096 -> 16384,
  w_out narrows back) on the pairs routed to `local` experts from `batch` tokens."""
  from mas_jax.layers import grouped_matmul as gmm_lib

  d, f = s['d_model'], s['expert_hidden']
  impl = moe_lib.resolve_expert_impl('auto', dropless=True)
  backend = {'ragged_dot': 'xla', 'mosaic_gpu': 'mosaic_gpu'}[impl]
  for local, batch in s['gmm_cases']:
    ids = np.sort(routed_pairs(s, batch, local))
    sizes = jnp.asarray(np.bincount(ids, minlength=local), jnp.int32)
    active = int(np.count_nonzero(np.asarray(sizes)))
    for name, k, n in (('w_in', d, f), ('w_out', f, d)):
      w = random_array(20, (local, k, n), k)
      lhs = random_array(21, (ids.size, k))
      tilings = gmm_lib.tilings_for(k, n, ids.size)  # what gmm picks for these rows
      run = jax.jit(lambda a, b, g, ts=tilings: gmm_lib.gmm(a, b, g, backend, tilings=ts))
      t, _ = _chain_time(s, lambda _, r=run, a=lhs, b=w, g=sizes: r(a, b, g), [lhs])
      nbytes = 2.0 * (active * k * n + ids.size * (k + n))
      yield (
        {
          'matmul': name,
          'impl': impl,
          'local_experts': local,
          'batch': batch,
          'pairs': int(ids.size),
          'tiling': dataclasses.asdict(tilings[0]),
          'time_s': t,
          'bytes': nbytes,
          'gbps': nbytes / t / 1e9,
        }
      )


# ---------------------------------------------------------------------------------------------
# 4. The whole model.


def model_config(s: dict):
  """configs/paper.py (bf16, the seed's shapes), generation settings: dropless, no dropout."""
  cd = paper.get_config()
  cd.model.expert_dropout = 0.0
  cd.model.dropless = True
  cd.data.source = 'synthetic'
  cd.parallel.strategy = 'reference'
  if s['smoke']:
    for field in ('d_model', 'num_experts', 'expert_hidden', 'vocab_size'):
      cd.model[field] = s[field]
    cd.model.num_heads = s['d_model'] // s['head_dim']
    cd.model.num_layers = s['layers']
  return config_lib.from_config_dict(cd)


# Fan-in of each weight of the reference layout (the model's initialiser: N(0, 1 / fan_in)).
_FAN_IN = {
  'wq': 'd',
  'wk': 'd',
  'wv': 'd',
  'wo': 'nh',
  'router': 'd',
  'w_in': 'd',
  'w_out': 'f',
  'unembed': 'd',
  'embed': 1,
}


def model_params(cfg, seed: int) -> dict:
  """Random weights in the reference layout, in the compute dtype (what serving keeps), drawn
  like the model's initialiser (N(0, 1 / fan_in); norm scales 1), on the device."""
  model = nnx.eval_shape(lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(0)))
  shapes = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  fan = {'d': cfg.d_model, 'nh': cfg.num_heads * cfg.head_dim, 'f': cfg.expert_hidden, 1: 1}
  dtype = jnp.dtype(cfg.compute_dtype)

  def make(path, leaf):
    name = path[-1].key
    if name == 'scale':
      return jnp.ones(leaf.shape, dtype)
    index = seed + zlib.crc32(jax.tree_util.keystr(path).encode()) % (1 << 30)
    return random_array(index, leaf.shape, fan[_FAN_IN[name]], dtype)

  return jax.tree_util.tree_map_with_path(make, shapes)


def model_bytes(cfg, batch: int, context: int, active_experts: float) -> float:
  """HBM bytes of one decode step: every weight but the embedding (of which B rows), the
  `active_experts` experts per layer some token routes to, the filled cache, the new KV."""
  b = jnp.dtype(cfg.compute_dtype).itemsize
  d, f, n_l = cfg.d_model, cfg.expert_hidden, cfg.num_layers
  attn = 4 * d * d + 2 * d + d * cfg.num_experts
  experts = active_experts * 2 * d * f
  kv = 2 * batch * (context - 1) * d + 2 * batch * d
  head = d * cfg.vocab_size + batch * d
  return b * (n_l * (attn + experts + kv) + head)


def time_model(s: dict, cfg, params: dict, batch: int) -> dict:
  """TPOT of the reference decode step (forward_cached + greedy next token, cache donated)."""
  context = s['model_context']
  start = jnp.full((batch,), context - 1, jnp.int32)

  def step(params, cache, tokens, start):
    logits, cache = model_lib.forward_cached(cfg, params, cache, tokens[:, None], start)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

  step = jax.jit(step, donate_argnums=(1,))
  shape = (cfg.num_layers, batch, context, cfg.num_heads, cfg.head_dim)
  dtype = jnp.dtype(cfg.compute_dtype)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, batch), jnp.int32)
  # Compiled before the cache exists: XLA's autotuner allocates inputs of the kernels it times
  # (17 GB for one cache at batch 256), which do not fit beside a 34 GB cache and the weights.
  abstract = {n: jax.ShapeDtypeStruct(shape, dtype) for n in ('k', 'v')}
  t0 = time.perf_counter()
  compiled = step.lower(params, abstract, tokens, start).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  cache = {'k': random_array(3, shape, 1.0, dtype), 'v': random_array(4, shape, 1.0, dtype)}
  jax.block_until_ready(cache)
  in_use = (jax.devices()[0].memory_stats() or {}).get('bytes_in_use', 0) / 1e9 or None

  def run(st):
    tok, cache = st
    tok, cache = compiled(params, cache, tok, start)
    return tok, cache

  t, states = _chain_time(s, run, [(tokens, cache)])
  del states
  # Experts some token routes to, per layer, under uniform top-k routing (the planner's count).
  unused = (cfg.num_experts - cfg.top_k) / cfg.num_experts
  active = cfg.num_experts * (1 - unused**batch)
  nbytes = model_bytes(cfg, batch, context, active)
  return {
    'batch': batch,
    'context': context,
    'tpot_s': t,
    'tokens_per_s': batch / t,
    'bytes': nbytes,
    'gbps': nbytes / t / 1e9,
    'compile_s': compile_s,
    'memory_args_gb': None if mem is None else mem.argument_size_in_bytes / 1e9,
    'memory_temp_gb': None if mem is None else mem.temp_size_in_bytes / 1e9,
    'in_use_gb': in_use,  # device memory held with the weights and the cache allocated
    'expert_impl': cfg.expert_impl,
    'resolved': moe_lib.resolve_expert_impl(cfg.expert_impl, dropless=True),
  }


def model_sweep(s: dict, meta: dict):
  """Yields the whole model's decode step per (expert impl, batch); fills `meta`."""
  cfg = model_config(s).model
  params = model_params(cfg, 11)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  meta.update(
    params=n_params,
    weight_gb=n_params * jnp.dtype(cfg.compute_dtype).itemsize / 1e9,
    layers=cfg.num_layers,
  )
  for impl, batch in s['model_cases']:
    try:
      yield time_model(s, dataclasses.replace(cfg, expert_impl=impl), params, batch)
    except Exception as e:  # noqa: BLE001  (out of memory, say: recorded, the rest still runs)
      yield {'batch': batch, 'expert_impl': impl, 'error': str(e).splitlines()[0][:200]}


# ---------------------------------------------------------------------------------------------
# Outputs.


def calibration(r: dict, s: dict) -> dict:
  """The planner's decode calibration (schema: mas_jax/perf/calibration.py)."""
  attn = [
    {
      'mode': 'decode',
      'heads': a['heads'],
      'batch': a['batch'],
      'seq': a['seq'],
      'd_model': s['d_model'],
      'head_dim': s['head_dim'],
      'time_s': a['time_s'],
    }
    for a in r.get('attention', [])
    if 'time_s' in a
  ]
  # The decode path's grouped kernel ('auto'); tokens = routed token-expert pairs. Several
  # batches can route the same pair count to one expert: the first (smallest batch) is kept.
  ffn, seen = [], set()
  for e in r.get('experts', []):
    key = (e['local_experts'], e.get('expert_hidden'), e.get('pairs'))
    if e['impl'] != 'auto' or 'time_s' not in e or key in seen:
      continue
    seen.add(key)
    ffn.append(
      {
        'local_experts': e['local_experts'],
        'tokens': e['pairs'],
        'dropless': True,
        'd_model': s['d_model'],
        'expert_hidden': e['expert_hidden'],
        'time_s': e['time_s'],
      }
    )
  c = r.get('ceilings', {})
  out = {'device': r['device'], 'source': 'bench/decode.py'}
  if c:
    out['matmul_tflops'] = c['matmul_bf16_tflops']
    out['hbm_gbps'] = c['hbm_copy_gbps']
  out['kernels'] = {'attention': attn, 'expert_ffn': ffn}
  return out


def _pct(gbps, ceiling) -> str:
  return f'{gbps / ceiling:.0%}' if ceiling else '-'


def markdown(r: dict) -> str:
  out = [f'# Decode on one {r["device"]}, JAX {r["jax"]}', '']
  out += ['Produced by (each run measures its own ceilings; percentages are of the HBM copy']
  out += ['ceiling of the run that measured the row):', '']
  for run in r['runs']:
    c = run['ceilings']
    out.append(
      f'- `python {run["command"]}`: HBM copy {c["hbm_copy_gbps"]:.0f} GB/s (read + write), '
      f'read-only reduction {c["hbm_read_gbps"]:.0f} GB/s, bf16 matmul '
      f'{c["matmul_bf16_tflops"]:.0f} TFLOP/s'
    )
  if r.get('variant_check'):
    out += [
      '',
      '## Attention core variants',
      '',
      'Max relative error against the first committed `cached_attention` (float32, small shape): '
      + ', '.join(f'{k} {v:.1e}' for k, v in r['variant_check'].items()),
      '',
      '| variant | heads | batch | context | us / layer | GB/s | % of ceiling | temporaries GB |',
      '|---|---|---|---|---|---|---|---|',
    ]
    for v in r.get('variants', []):
      if 'time_s' in v:
        out.append(
          f'| {v["variant"]} | {v["heads"]} | {v["batch"]} | {v["seq"]} | '
          f'{v["time_s"] * 1e6:.1f} | {v["gbps"]:.0f} | {_pct(v["gbps"], v.get("ceiling_gbps"))} | '
          f'{v.get("temp_gb") or 0:.2f} |'
        )
  if r.get('attention'):
    batches = sorted({a['batch'] for a in r['attention']})
    out += [
      '',
      '## Attention device: norm + attention_cached + write_cache, per layer',
      '',
      'Each cell: microseconds per layer / achieved GB/s / % of the copy ceiling.',
      '',
      '| context | heads | ' + ' | '.join(f'batch {b}' for b in batches) + ' |',
      '|---|---|' + '---|' * len(batches),
    ]
    keys = sorted({(a['seq'], a['heads']) for a in r['attention']})
    for seq, heads in keys:
      cells = []
      for b in batches:
        a = next(
          (x for x in r['attention'] if (x['seq'], x['heads'], x['batch']) == (seq, heads, b)),
          None,
        )
        if a is None or 'time_s' not in a:
          cells.append('-' if a is None else a.get('skipped', a.get('error', '-')))
        else:
          cells.append(
            f'{a["time_s"] * 1e6:.1f} / {a["gbps"]:.0f} / {_pct(a["gbps"], a.get("ceiling_gbps"))}'
          )
      out.append(f'| {seq} | {heads} | ' + ' | '.join(cells) + ' |')
  if r.get('experts'):
    batches = sorted({e['batch'] for e in r['experts']})
    out += [
      '',
      '## Expert device: local experts on their routed pairs, per layer',
      '',
      'Each cell: pairs / microseconds / achieved GB/s / % of the copy ceiling. `auto` is the '
      'dropless decode path (resolved kernel in brackets); `einsum_seq` is the capacity einsum '
      'with capacity 1 per sequence (every sequence through every local expert), `einsum_pad` '
      'one group padded to the largest expert load.',
      '',
      '| impl | local experts | hidden | ' + ' | '.join(f'batch {b}' for b in batches) + ' |',
      '|---|---|---|' + '---|' * len(batches),
    ]
    keys = []
    for e in r['experts']:
      k = (e['impl'], e['local_experts'], e.get('expert_hidden'))
      if k not in keys:
        keys.append(k)
    for impl, local, hidden in keys:
      cells, resolved = [], ''
      for b in batches:
        e = next(
          (
            x
            for x in r['experts']
            if (x['impl'], x['local_experts'], x.get('expert_hidden'), x['batch'])
            == (impl, local, hidden, b)
          ),
          None,
        )
        if e is None or 'time_s' not in e:
          cells.append('-' if e is None else 'error')
        else:
          resolved = e['resolved']
          cells.append(
            f'{e["pairs"]} / {e["time_s"] * 1e6:.0f} / {e["gbps"]:.0f} / '
            f'{_pct(e["gbps"], e.get("ceiling_gbps"))}'
          )
      name = f'{impl} ({resolved})' if impl == 'auto' else impl
      out.append(f'| {name} | {local} | {hidden} | ' + ' | '.join(cells) + ' |')
  if r.get('gmm'):
    out += [
      '',
      "## The grouped kernel's two matmuls apart (decode path, one layer)",
      '',
      '| matmul | local experts | batch | pairs | tiling (block_m, block_n, block_k) | us | GB/s | '
      '% of ceiling |',
      '|---|---|---|---|---|---|---|---|',
    ]
    for g in r['gmm']:
      t = g['tiling']
      out.append(
        f'| {g["matmul"]} ({g["impl"]}) | {g["local_experts"]} | {g["batch"]} | {g["pairs"]} | '
        f'{t["block_m"]}, {t["block_n"]}, {t["block_k"]} | {g["time_s"] * 1e6:.0f} | '
        f'{g["gbps"]:.0f} | {_pct(g["gbps"], g.get("ceiling_gbps"))} |'
      )
  out += target_summary(r)
  out += yardstick_table(r)
  if r.get('model'):
    m = r['model']
    out += [
      '',
      f'## Whole model: reference decode step, {m["layers"]} layers, {m["params"] / 1e9:.2f} B '
      f'parameters ({m["weight_gb"]:.1f} GB), context {s_context(m)}',
      '',
      '| experts | batch | TPOT ms | tokens/s | GB/s | % of ceiling | memory args + temp GB | '
      'held GB |',
      '|---|---|---|---|---|---|---|---|',
    ]
    for row in m['rows']:
      impl = row.get('expert_impl', 'auto')
      impl = f'{impl} ({row["resolved"]})' if 'resolved' in row and impl == 'auto' else impl
      if 'error' in row:
        out.append(f'| {impl} | {row["batch"]} | error: {row["error"]} | | | | | |')
        continue
      mem = (
        '-'
        if row['memory_args_gb'] is None
        else f'{row["memory_args_gb"]:.1f} + {row["memory_temp_gb"]:.1f}'
      )
      peak = '-' if row.get('in_use_gb') is None else f'{row["in_use_gb"]:.1f}'
      out.append(
        f'| {impl} | {row["batch"]} | {row["tpot_s"] * 1e3:.3f} | {row["tokens_per_s"]:,.0f} | '
        f'{row["gbps"]:.0f} | {_pct(row["gbps"], row.get("ceiling_gbps"))} | {mem} | {peak} |'
      )
  return '\n'.join(out) + '\n'


_YARDSTICK_LINE = re.compile(
  r'(attention|experts) (?:k|E)=\s*(\d+) B=\s*(\d+)(?: S=(\d+))?:\s*([\d.]+) us\s+(\d+) GB/s'
)


def attach_yardsticks(result: dict, specs: list[str]) -> None:
  """Parses yardstick logs ('RUN:LOG') into result['runs'][RUN]['yardstick']."""
  for spec in specs:
    index, path = spec.split(':', 1)
    rows = []
    with open(path) as f:
      for line in f:
        if m := _YARDSTICK_LINE.search(line):
          role, n, batch, seq, us, gbps = m.groups()
          rows.append(
            {
              'role': role,
              'n': int(n),
              'batch': int(batch),
              'seq': int(seq or 0),
              'time_s': float(us) * 1e-6,
              'gbps': float(gbps),
            }
          )
    result['runs'][int(index)]['yardstick'] = {'log': path, 'rows': rows}


def yardstick_table(r: dict) -> list[str]:
  """Our role steps against the plain-JAX yardstick of the same device call (time ratios)."""
  out = []
  for run in r.get('runs', []):
    if 'yardstick' not in run:
      continue
    ceiling = run['ceilings']['hbm_copy_gbps']
    mine = lambda rows, c=ceiling: [  # noqa: E731
      x for x in rows if x.get('ceiling_gbps') == c and 'time_s' in x
    ]
    attn = {(x['heads'], x['batch'], x['seq']): x for x in mine(r.get('attention', []))}
    experts = {}
    for x in mine(r.get('experts', [])):
      if x['expert_hidden'] == GPU['expert_hidden']:
        experts[(x['impl'], x['local_experts'], x['batch'])] = x
    rows = []
    for y in run['yardstick']['rows']:
      if y['role'] == 'attention' and (a := attn.get((y['n'], y['batch'], y['seq']))):
        rows.append(
          f'| attention, {y["n"]} heads | {y["batch"]} | {y["time_s"] * 1e6:.1f} | '
          f'{a["time_s"] * 1e6:.1f} | {y["time_s"] / a["time_s"]:.2f} | - |'
        )
      elif y['role'] == 'experts' and (e := experts.get(('auto', y['n'], y['batch']))):
        pad = experts.get(('einsum_pad', y['n'], y['batch']))
        rows.append(
          f'| experts, {y["n"]} local | {y["batch"]} | {y["time_s"] * 1e6:.1f} | '
          f'{e["time_s"] * 1e6:.1f} | {y["time_s"] / e["time_s"]:.2f} | '
          + (f'{y["time_s"] / pad["time_s"]:.2f} |' if pad else '- |')
        )
    if rows:
      out += [
        '',
        f'## Against the yardstick of the same call (`{run["yardstick"]["log"]}`)',
        '',
        'The yardstick (../shared/bench/yardstick_decode.py) times a plain-JAX step of each '
        'role: attention without the norm and the cache write, experts on B x 2 / 16 tokens '
        'per expert. Speed = yardstick time / our time (above 1: ours is faster).',
        '',
        '| role | batch | yardstick us | ours us | speed, decode path | speed, einsum_pad |',
        '|---|---|---|---|---|---|',
        *rows,
      ]
  return out


def target_summary(r: dict) -> list[str]:
  """Which role steps reach 80% of the copy ceiling at batch >= 24 (the issue's target)."""
  out = []
  for name, rows, label in (
    ('attention', r.get('attention', []), lambda a: f'{a["heads"]} heads, context {a["seq"]}'),
    (
      'experts (decode path)',
      [e for e in r.get('experts', []) if e['impl'] == 'auto'],
      lambda e: f'{e["local_experts"]} experts of hidden {e["expert_hidden"]}',
    ),
  ):
    timed = [x for x in rows if 'gbps' in x and x['batch'] >= 24 and x.get('ceiling_gbps')]
    if not timed:
      continue
    missed = [x for x in timed if x['gbps'] < 0.8 * x['ceiling_gbps']]
    out += [
      '',
      f'Target (>= 80% of the copy ceiling at batch >= 24), {name}: {len(timed) - len(missed)} '
      f'of {len(timed)} cases reach it.'
      + (
        ' Missed: '
        + '; '.join(
          f'{label(x)}, batch {x["batch"]}: {x["gbps"] / x["ceiling_gbps"]:.0%}' for x in missed
        )
        + '.'
        if missed
        else ''
      ),
    ]
  return out


def s_context(m: dict) -> str:
  rows = [r for r in m['rows'] if 'context' in r]
  return str(rows[0]['context']) if rows else '-'


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--smoke', action='store_true', help='tiny shapes (CPU smoke test)')
  parser.add_argument('--out', default='docs/benchmarks')
  parser.add_argument(
    '--sections',
    default=','.join(s for s in SECTIONS if s != 'variants'),
    help=f'comma list of {SECTIONS}, run in this order (the ceilings are always measured)',
  )
  parser.add_argument(
    '--merge',
    metavar='RESULT_JSON',
    help='keep the sections of this earlier result file that this run does not measure',
  )
  parser.add_argument('--dump_hlo', default=None, help="folder for the variants' compiled HLO")
  parser.add_argument(
    '--yardstick',
    action='append',
    default=[],
    metavar='RUN:LOG',
    help='output of ../shared/bench/yardstick_decode.py run in the same device call as run '
    "number RUN (0-based) of the result: compared with that run's rows",
  )
  parser.add_argument(
    '--render_only',
    action='store_true',
    help='measure nothing: rewrite the tables and calibration of the --merge file',
  )
  args = parser.parse_args()
  s = SMOKE if args.smoke else GPU
  order = [x for x in args.sections.split(',') if x]
  if unknown := set(order) - set(SECTIONS):
    parser.error(f'unknown sections {sorted(unknown)}; known: {SECTIONS}')
  stem = common.device_stem(args.smoke) + '_decode'
  if args.render_only:
    with open(args.merge) as f:
      result = json.load(f)
    attach_yardsticks(result, args.yardstick)
    stem = os.path.basename(args.merge).removesuffix('.json')
    common.write_result(args.out, stem, result, markdown(result))
    with open(os.path.join(args.out, f'{stem}_calibration.json'), 'w') as f:
      json.dump(calibration(result, s), f, indent=1)
    print(markdown(result))
    return
  result = {'device': jax.devices()[0].device_kind, 'jax': jax.__version__, 'runs': []}
  if args.merge:
    with open(args.merge) as f:
      result = {**json.load(f), 'device': result['device'], 'jax': result['jax']}
  run = {'command': ' '.join(sys.argv), 'sections': order, 'jax': jax.__version__}
  result['runs'] = [*result.get('runs', []), run]
  attach_yardsticks(result, args.yardstick)

  def save():  # after every row, so a cut-off run keeps what it measured
    common.write_result(args.out, stem, result, markdown(result))
    with open(os.path.join(args.out, f'{stem}_calibration.json'), 'w') as f:
      json.dump(calibration(result, s), f, indent=1)

  result['ceilings'] = run['ceilings'] = ceilings(s)
  print('ceilings', result['ceilings'], flush=True)
  save()
  meta = {}
  sweeps = {
    'variants': lambda: variants(s, args.dump_hlo),
    'attention': lambda: attention_sweep(s),
    'experts': lambda: expert_sweep(s),
    'gmm': lambda: gmm_split(s),
    'model': lambda: model_sweep(s, meta),
  }
  for name in order:
    if name == 'ceilings':
      continue
    if name == 'variants':
      result['variant_check'] = variant_check(s)
      print('variant_check', result['variant_check'], flush=True)
      if args.dump_hlo:
        os.makedirs(args.dump_hlo, exist_ok=True)
    rows = []
    if name == 'model':
      result['model'] = {'rows': rows}
    else:
      result[name] = rows
    for row in sweeps[name]():
      rows.append({**row, 'ceiling_gbps': run['ceilings']['hbm_copy_gbps']})
      if name == 'model':
        result['model'].update(meta)
      print(f'{time.perf_counter() - T0:.0f}s', name, rows[-1], flush=True)
      save()
  print(markdown(result))


if __name__ == '__main__':
  main()
