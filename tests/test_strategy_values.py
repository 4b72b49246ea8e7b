"""The strategies' collectives checked on values: known inputs in, exact or NumPy-computed out.

The strategy-vs-reference tests compare whole models, where a broken collective can hide under a
small attention output (a dropped reduction once moved the loss by 7e-5 only). Here each
collective's unit runs alone in `jax.shard_map` on 4-16 of the fake CPU devices, with inputs
chosen so that a lost, doubled or misrouted part is O(1) or larger:
  - ma_sep: `_exchange` (psum of the attention partials, ppermute or psum of the MoE output),
    flat and hierarchical, on integer-valued inputs whose sums are exact in float32; and the
    tick schedule `_run_ticks` with affine stand-ins for attention and experts.
  - tp_pp: `tp_attention` against attention in NumPy, and `tp_block` against the reference
    block, with the heads and the expert hidden dim split over 'tensor'.
  - ep: `ep_moe_ffn` (dispatch and return all_to_all) against the single-device MoE FFN.
Each device's copy of an output comes back (out_specs split a leading device axis), so a value
that is right on one device and wrong on another fails.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from strategy_harness import small_config

from mas_jax import mesh as mesh_lib
from mas_jax import model as model_lib
from mas_jax import strategies
from mas_jax.layers import moe as moe_lib
from mas_jax.mesh import ALL_AXES
from mas_jax.strategies import ep as ep_lib
from mas_jax.strategies import tp_pp as tp_lib
from mas_jax.strategies.ma_separation import _to_varying

RTOL = 1e-5


def _ma_sep(attn, moe, dispatch, hierarchical, microbatches=1):
  config = small_config(
    **{
      'parallel.strategy': 'ma_sep',
      'parallel.attn_devices': attn,
      'parallel.moe_devices': moe,
      'parallel.num_microbatches': microbatches,
      'parallel.moe_dispatch': dispatch,
      'parallel.hierarchical_allreduce': hierarchical,
      'model.num_experts': 24,  # divides over 4, 8 and 12 expert devices
    }
  )
  strategy = strategies.get(config)
  assert strategy.dispatch == dispatch
  return strategy


def _pattern(shape) -> np.ndarray:
  """Small distinct integers 1..7 (exact in float32 after any sum of a few hundred copies)."""
  return (np.arange(np.prod(shape)).reshape(shape) % 7 + 1).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# ma_sep: the tick exchange.
# ---------------------------------------------------------------------------------------------

# (attention devices, expert devices, dispatch): 3 attention rows and 1 expert row (12:4),
# 1 and 1 (8:8), 1 and 3 (4:12, expert devices spanning rows: replicated only).
EXCHANGE_CASES = [
  (12, 4, 'all_to_all'),
  (12, 4, 'replicated'),
  (8, 8, 'all_to_all'),
  (4, 12, 'replicated'),
]
SHAPE = (2, 3, 4)  # [b, T, D] of one micro-batch


def _exchange_inputs(strategy):
  """contrib[n, 2, b, T, D] as the tick's branches leave it, and the exchange's exact result.

  Slot 0 (attention partials): attention device d holds (d + 1) * pattern, expert devices zeros.
  Slot 1 (MoE output): expert device j (0-based among the expert devices) holds
  (100 + j) * pattern, attention devices zeros; with all_to_all dispatch each expert device of
  the one expert row holds the whole output of its column.
  """
  lay = strategy.layout
  base = _pattern(SHAPE)
  contrib = np.zeros((lay.n_devices, 2, *SHAPE), np.float32)
  for d in range(lay.n_attn):
    contrib[d, 0] = (d + 1) * base
  for j in range(lay.n_moe):
    contrib[lay.n_attn + j, 1] = (100 + j) * base
  expected = np.zeros_like(contrib)
  expected[:, 0] = contrib[:, 0].sum(0)  # every device: the sum of every head partial
  if strategy.dispatch == 'replicated':
    expected[:, 1] = contrib[:, 1].sum(0)  # partial sums over experts, added up everywhere
  else:
    # Every device of column c receives the output of the expert device in column c, once.
    for d in range(lay.n_devices):
      expected[d, 1] = contrib[lay.n_attn + d % lay.cols, 1]
  return contrib, expected


def _run_exchange(strategy, contrib):
  def body(c):  # c: f32[1, 2, b, T, D], this device's contribution
    attn, moe = strategy._exchange(c[0, 0], c[0, 1])
    return jnp.stack([attn, moe])[None]

  spec = P(ALL_AXES)
  return np.asarray(
    jax.jit(jax.shard_map(body, mesh=strategy.mesh, in_specs=spec, out_specs=spec))(contrib)
  )


@pytest.mark.parametrize('attn, moe, dispatch', EXCHANGE_CASES)
def test_ma_sep_exchange_delivers_each_output_once(attn, moe, dispatch):
  """Every device gets the sum of all head partials and its column's MoE output exactly once;
  the flat and the hierarchical all-reduce give the same (exact) numbers."""
  flat = _ma_sep(attn, moe, dispatch, hierarchical=False)
  hier = _ma_sep(attn, moe, dispatch, hierarchical=True)
  contrib, expected = _exchange_inputs(flat)
  for strategy in (flat, hier):
    got = _run_exchange(strategy, contrib)
    for d in range(flat.layout.n_devices):
      np.testing.assert_array_equal(
        got[d], expected[d], err_msg=f'device {d}, hierarchical={strategy is hier}'
      )


def _affine_roles(strategy):
  """Stand-ins for the roles' work whose composition NumPy can follow exactly.

  Attention device d adds (x + (d + 1) * (layer + 1)) to the head sum; expert device j returns
  a_j * h + c_j(layer, micro): the whole output with all_to_all dispatch (a = 2 on every
  expert device), a partial sum over expert devices with replicated dispatch.
  """
  lay = strategy.layout
  replicated = strategy.dispatch == 'replicated'

  def coef(j):
    return (2.0 if j == 0 else 0.0) if replicated else 2.0

  def const(j, layer, micro):
    return (j + 1) * (micro + 1) + 10.0 * layer if replicated else (micro + 1) + 10.0 * layer

  def numpy_model(x, layer, micro):  # x -> h -> x of one block
    attn_sum = sum(x + (d + 1) * (layer + 1) for d in range(lay.n_attn))
    h = x + attn_sum
    experts = range(lay.n_moe) if replicated else [0]
    return h + sum(coef(j) * h + const(j, layer, micro) for j in experts)

  def jax_roles(device):
    j = device - lay.n_attn

    def attention(layer, micro, x, operands, weights):
      return x + ((device + 1) * (layer + 1)).astype(x.dtype), None

    def experts(layer, micro, h, operands, weights):
      a = jnp.where(j == 0, 2.0, 0.0) if replicated else 2.0
      c = jnp.asarray(const(j, layer, micro), h.dtype)
      return a * h + c, _to_varying({'items': jnp.ones(())})

    return attention, experts

  return numpy_model, jax_roles


@pytest.mark.parametrize(
  'attn, moe, dispatch, hierarchical',
  [(12, 4, 'all_to_all', True), (4, 12, 'replicated', False)],
)
def test_ma_sep_ticks_apply_every_layer_once_per_microbatch(attn, moe, dispatch, hierarchical):
  """2 layers x 2 micro-batches through the co-execution schedule: every device ends with the
  residual stream NumPy computes layer by layer, and each expert device ran L * M items."""
  strategy = _ma_sep(attn, moe, dispatch, hierarchical, microbatches=2)
  lay, num_layers, n_mb = strategy.layout, strategy.config.model.num_layers, 2
  numpy_model, jax_roles = _affine_roles(strategy)
  x0 = _pattern((n_mb, *SHAPE))  # micro-batch m is x0[m]

  def body(x0):
    device = mesh_lib.device_index()
    attention, experts = jax_roles(device)
    xs, stats, _ = strategy._run_ticks(
      [_to_varying(x0[m]) for m in range(n_mb)],
      attention,
      experts,
      None,
      None,
      lambda: _to_varying({'items': jnp.zeros(())}),
    )
    return jnp.stack(xs)[None], stats['items'][None]

  run = jax.shard_map(body, mesh=strategy.mesh, in_specs=P(), out_specs=P(ALL_AXES))
  xs, items = map(np.asarray, jax.jit(run)(x0))
  expected = np.stack(
    [
      _compose(lambda x, layer, m=m: numpy_model(x, layer, m), x0[m], num_layers)
      for m in range(n_mb)
    ]
  )
  for d in range(lay.n_devices):
    np.testing.assert_array_equal(xs[d], expected, err_msg=f'device {d}')
  np.testing.assert_array_equal(items, [0] * lay.n_attn + [num_layers * n_mb] * lay.n_moe)


def _compose(block, x, num_layers):
  for layer in range(num_layers):
    x = block(x, layer)
  return x


# ---------------------------------------------------------------------------------------------
# tp_pp: the psums over 'tensor'.
# ---------------------------------------------------------------------------------------------

TP = 4


def _tp_mesh():
  return jax.make_mesh(
    (TP,),
    (tp_lib.TENSOR_AXIS,),
    devices=jax.devices()[:TP],
    axis_types=(jax.sharding.AxisType.Auto,),
  )


def _numpy_attention(x, p, rope_base):
  """Causal multi-head attention with rotate-half RoPE in float64: x[B, T, D] -> [B, T, D]."""
  x = x.astype(np.float64)
  q, k, v = (np.einsum('btd,dnh->btnh', x, np.asarray(p[w], np.float64)) for w in 'qkv')
  half = q.shape[-1] // 2
  angle = np.arange(x.shape[1])[:, None] * rope_base ** (-np.arange(half) / half)  # [T, H/2]
  cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]

  def rope(a):
    a1, a2 = a[..., :half], a[..., half:]
    return np.concatenate([a1 * cos - a2 * sin, a2 * cos + a1 * sin], axis=-1)

  q, k = rope(q), rope(k)
  scores = np.einsum('btnh,bsnh->bnts', q, k) / np.sqrt(q.shape[-1])
  t = x.shape[1]
  scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  o = np.einsum('bnts,bsnh->btnh', probs, v)
  return np.einsum('btnh,nhd->btd', o, np.asarray(p['o'], np.float64))


def _layer_params(cfg, seed=0):
  """One layer's parameters (no layer axis) in NumPy: the model's init scales, except wo with
  unit variance so that the attention output is O(1)."""
  rng = np.random.default_rng(seed)
  d, n, h, e, f = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.num_experts, cfg.expert_hidden
  normal = lambda shape, fan_in: (rng.normal(size=shape) / np.sqrt(fan_in)).astype(np.float32)
  return {
    'attn_norm': {'scale': np.ones(d, np.float32)},
    'attn': {
      'wq': normal((d, n, h), d),
      'wk': normal((d, n, h), d),
      'wv': normal((d, n, h), d),
      'wo': normal((n, h, d), 1),
    },
    'mlp_norm': {'scale': np.ones(d, np.float32)},
    'moe': {
      'router': normal((d, e), d),
      'w_in': normal((e, d, f), d),
      'w_out': normal((e, f, d), f),
    },
  }


def test_tp_attention_sums_the_head_shards():
  """Each tensor device holds 2 of 8 heads; after the psum every device holds attention over
  all heads (NumPy, float64). Without the psum each device would hold its own heads' part."""
  cfg = small_config().model
  p = _layer_params(cfg)['attn']
  x = np.random.default_rng(1).normal(size=(2, 6, cfg.d_model)).astype(np.float32)
  heads = P(None, tp_lib.TENSOR_AXIS, None)
  specs = {'wq': heads, 'wk': heads, 'wv': heads, 'wo': P(tp_lib.TENSOR_AXIS)}

  def body(x, p):
    return tp_lib.tp_attention(cfg, x, p)[0][None]  # [1, G, T, D]

  run = jax.shard_map(body, mesh=_tp_mesh(), in_specs=(P(), specs), out_specs=P(tp_lib.TENSOR_AXIS))
  got = np.asarray(jax.jit(run)(x, p))
  expected = _numpy_attention(x, {w: p[f'w{w}'] for w in 'qkvo'}, cfg.rope_base)
  assert np.abs(expected).max() > 0.5  # a lost head shard is an O(1) error
  for d in range(TP):
    np.testing.assert_allclose(got[d], expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())


def test_tp_block_equals_the_reference_block():
  """tp_block (heads and every expert's hidden dim split 4 ways, both outputs psum-ed over
  'tensor', tokens dropped at capacity) equals `model.block_forward` on every device."""
  config = small_config(**{'model.capacity_factor': 0.5})
  cfg = config.model
  p = _layer_params(cfg)
  x = np.random.default_rng(2).normal(size=(4, 8, cfg.d_model)).astype(np.float32)
  cap = moe_lib.capacity(x.shape[1], cfg.top_k, cfg.num_experts, cfg.capacity_factor, False)
  specs = jax.tree.map(lambda _: P(), p)
  heads = P(None, tp_lib.TENSOR_AXIS, None)
  specs['attn'] = {'wq': heads, 'wk': heads, 'wv': heads, 'wo': P(tp_lib.TENSOR_AXIS)}
  specs['moe']['w_in'] = P(None, None, tp_lib.TENSOR_AXIS)  # [E, D, F/tp]
  specs['moe']['w_out'] = P(None, tp_lib.TENSOR_AXIS, None)  # [E, F/tp, D]

  def body(x, p):
    y, stats, _ = tp_lib.tp_block(cfg, x, p, cap, None, 0)
    return y[None], stats['dropped'][None]

  run = jax.shard_map(body, mesh=_tp_mesh(), in_specs=(P(), specs), out_specs=P(tp_lib.TENSOR_AXIS))
  got, dropped = map(np.asarray, jax.jit(run)(x, p))
  expected, stats = jax.jit(lambda x, p: model_lib.block_forward(cfg, p, x, None))(x, p)
  expected = np.asarray(expected)
  assert stats['dropped'] > 0
  assert np.abs(expected - x).max() > 0.5  # attention and MoE outputs are O(1)
  for d in range(TP):
    np.testing.assert_allclose(got[d], expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())
    assert dropped[d] == stats['dropped']


# ---------------------------------------------------------------------------------------------
# ep: the dispatch and return all_to_all.
# ---------------------------------------------------------------------------------------------


def test_ep_moe_ffn_returns_each_expert_output_to_its_tokens():
  """ep_moe_ffn on a (data 2, expert 4) mesh, 16 experts (4 per device), 2 sequences per
  device, tokens dropped at capacity: each device's outputs and routing statistics equal the
  single-device MoE FFN's on its sequences. (E/ep = ep: a return all_to_all with its split and
  concat axes swapped still traces, and must fail here on values.)"""
  config = small_config(**{'model.capacity_factor': 0.5})
  cfg = config.model
  p = _layer_params(cfg)['moe']
  p = {**p, 'router': p['router'] * 4.0}  # sharper routing: experts differ in load
  ep, data, g = 4, 2, 2
  x = np.random.default_rng(3).normal(size=(data * ep * g, 8, cfg.d_model)).astype(np.float32)
  cap = moe_lib.capacity(x.shape[1], cfg.top_k, cfg.num_experts, cfg.capacity_factor, False)
  mesh = jax.make_mesh(
    (data, ep),
    (ep_lib.DATA_AXIS, ep_lib.EXPERT_AXIS),
    devices=jax.devices()[: data * ep],
    axis_types=(jax.sharding.AxisType.Auto,) * 2,
  )
  rows = P((ep_lib.DATA_AXIS, ep_lib.EXPERT_AXIS))
  specs = {'router': P(), 'w_in': P(ep_lib.EXPERT_AXIS), 'w_out': P(ep_lib.EXPERT_AXIS)}

  def body(x, p):
    y, stats = ep_lib.ep_moe_ffn(cfg, x, p, cap, None, 0)
    return y, jax.tree.map(lambda s: s[None], stats)

  y, stats = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(rows, specs), out_specs=rows))(x, p)
  expected, ref_stats = jax.jit(
    lambda x, p: moe_lib.moe_ffn(x, p, top_k=cfg.top_k, cap=cap, activation=cfg.activation)
  )(x, p)
  expected = np.asarray(expected)
  assert ref_stats['dropped'] > 0
  assert np.abs(expected).max() > 0.5
  np.testing.assert_allclose(y, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())
  for name, value in ref_stats.items():
    np.testing.assert_allclose(np.sum(stats[name], axis=0), value, rtol=RTOL, err_msg=name)
