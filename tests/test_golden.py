"""Golden values computed without the code under test: NumPy float64 forwards and hand cases.

Every strategy test compares a strategy with the reference model, so a bug in the math they
share (RoPE, routing statistics, expert dropout, the optimizer) passes them all. The expected
values here come from small NumPy implementations written from the documented formulas
(mas_jax/layers/*.py docstrings, configs/tiny.py), never from mas_jax itself; dropout bits are
drawn with jax.random directly, following the documented key derivation.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_close
from flax import nnx

from mas_jax import model as model_lib
from mas_jax import train_lib
from mas_jax.config import ModelConfig, TrainConfig
from mas_jax.layers import attention as attn_lib
from mas_jax.layers import moe

# S = 8 tokens per sequence, E = 4, K = 2, capacity_factor 0.5: C = ceil(0.5 * 8 * 2 / 4) = 2
# slots for the 4 assignments an expert gets on average, so about half of them are dropped.
CFG = ModelConfig(
  vocab_size=32,
  num_layers=2,
  d_model=16,
  num_heads=2,
  num_experts=4,
  top_k=2,
  expert_hidden=8,
  capacity_factor=0.5,
  dropless=False,
  rope_base=100.0,
)
BATCH, SEQ = 2, 8
EPS = 1e-6

# ---------------------------------------------------------------------------------------------
# NumPy float64 model, written from the docstrings.
# ---------------------------------------------------------------------------------------------


def params_np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def np_rms_norm(x, scale):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * scale


def np_rope(x, positions, base):
  """Rotate-half RoPE of x[..., T, N, H]: the pair (i, i + H/2) turns by pos * base^(-2i/H)."""
  h = x.shape[-1]
  half = h // 2
  out = np.empty_like(x)
  for i in range(half):
    theta = np.asarray(positions, np.float64) * base ** (-2.0 * i / h)  # [T]
    cos, sin = np.cos(theta)[:, None], np.sin(theta)[:, None]  # [T, 1]
    a, b = x[..., i], x[..., i + half]  # [..., T, N]
    out[..., i] = a * cos - b * sin
    out[..., i + half] = a * sin + b * cos
  return out


def np_softmax(z):
  z = z - np.max(z, axis=-1, keepdims=True)
  e = np.exp(z)
  return e / np.sum(e, axis=-1, keepdims=True)


def np_logsumexp(z):
  m = np.max(z, axis=-1, keepdims=True)
  return (m + np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True)))[..., 0]


def np_attention(x, p, positions, base):
  """Causal multi-head attention of x[B, T, D] with RoPE on q and k, scores / sqrt(H)."""
  q = np_rope(np.einsum('btd,dnh->btnh', x, p['wq']), positions, base)
  k = np_rope(np.einsum('btd,dnh->btnh', x, p['wk']), positions, base)
  v = np.einsum('btd,dnh->btnh', x, p['wv'])
  t, h = x.shape[1], q.shape[-1]
  scores = np.einsum('btnh,bsnh->bnts', q, k) / math.sqrt(h)
  scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
  o = np.einsum('bnts,bsnh->btnh', np_softmax(scores), v)
  return np.einsum('btnh,nhd->btd', o, p['wo'])


def np_gelu(x):
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def np_moe(x, p, top_k, cap, keep=None, rate=0.0):
  """Switch MoE of x[G, S, D] with capacity `cap`; keep[G, E, C, F] optional dropout bits.

  Queues fill choice-major (every token's first choice, then every second choice), tokens in
  order within a choice; an assignment that finds its expert's queue full is dropped.
  """
  g_count, s_count, _ = x.shape
  e_count = p['router'].shape[-1]
  y = np.zeros_like(x)
  stats = {'aux': 0.0, 'z': 0.0, 'dropped': 0, 'counts': np.zeros(e_count)}
  for g in range(g_count):
    logits = x[g] @ p['router']  # [S, E]
    probs = np_softmax(logits)
    experts = np.argsort(-probs, axis=-1, kind='stable')[:, :top_k]  # [S, K]
    gates = np.take_along_axis(probs, experts, axis=-1)
    gates = gates / gates.sum(-1, keepdims=True)
    fill = np.zeros(e_count, int)
    for k in range(top_k):
      for s in range(s_count):
        e = experts[s, k]
        slot = fill[e]
        fill[e] += 1
        if slot >= cap:
          stats['dropped'] += 1
          continue
        hidden = np_gelu(x[g, s] @ p['w_in'][e])  # [F]
        if keep is not None:
          hidden = np.where(keep[g, e, slot], hidden / (1.0 - rate), 0.0)
        y[g, s] += gates[s, k] * (hidden @ p['w_out'][e])
    counts = np.bincount(experts.ravel(), minlength=e_count)
    stats['aux'] += e_count * np.sum(counts / (s_count * top_k) * probs.mean(0))
    stats['z'] += np.sum(np_logsumexp(logits) ** 2)
    stats['counts'] += counts
  return y, stats


def np_forward(cfg, params, tokens, keep=None):
  """Logits [B, T, V] and stats summed over layers; keep: per-layer dropout bits or None."""
  params = params_np(params)
  cap = min(SEQ, math.ceil(cfg.capacity_factor * SEQ * cfg.top_k / cfg.num_experts))
  x = params['embed'][np.asarray(tokens)]
  total = {'aux': 0.0, 'z': 0.0, 'dropped': 0, 'counts': np.zeros(cfg.num_experts)}
  for layer in range(cfg.num_layers):
    p = jax.tree.map(lambda a, i=layer: a[i], params['blocks'])
    x = x + np_attention(
      np_rms_norm(x, p['attn_norm']['scale']), p['attn'], np.arange(SEQ), cfg.rope_base
    )
    y, stats = np_moe(
      np_rms_norm(x, p['mlp_norm']['scale']),
      p['moe'],
      cfg.top_k,
      cap,
      None if keep is None else keep[layer],
      cfg.expert_dropout,
    )
    x = x + y
    total = jax.tree.map(lambda a, b: a + b, total, stats)
  logits = np_rms_norm(x, params['final_norm']['scale']) @ params['unembed']
  return logits, total


def np_keep_bits(key, cfg, cap):
  """Dropout bits as documented: layer l uses fold_in(key, l), block (g, e) fold_in twice."""
  out = []
  for layer in range(cfg.num_layers):
    layer_key = jax.random.fold_in(key, layer)
    out.append(
      np.array(
        [
          [
            jax.random.bernoulli(
              jax.random.fold_in(jax.random.fold_in(layer_key, g), e),
              1.0 - cfg.expert_dropout,
              (cap, cfg.expert_hidden),
            )
            for e in range(cfg.num_experts)
          ]
          for g in range(BATCH)
        ]
      )
    )
  return out


# ---------------------------------------------------------------------------------------------
# Fixtures.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def model():
  """The tiny model with random norm scales (ones would hide a scale that is never applied)."""
  m = model_lib.Transformer(CFG, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  for norm in (m.blocks.attn_norm, m.blocks.mlp_norm, m.final_norm):
    norm.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, norm.scale.shape), jnp.float32)
  return m


@pytest.fixture(scope='module')
def params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.fixture(scope='module')
def batch():
  return jax.random.randint(jax.random.key(7), (BATCH, SEQ + 1), 0, CFG.vocab_size)


# ---------------------------------------------------------------------------------------------
# RoPE and attention.
# ---------------------------------------------------------------------------------------------


def test_rope_known_rotation():
  # A unit vector on the first axis of pair i turns by pos * base^(-2i/H) into the plane of
  # axes (i, i + H/2): H = 4, base 100, pair 0 at angle pos, pair 1 at angle pos / 10.
  positions = jnp.array([0, 1, 3])
  e0 = jnp.zeros((1, 3, 1, 4)).at[..., 0].set(1.0)
  e1 = jnp.zeros((1, 3, 1, 4)).at[..., 1].set(1.0)
  p = np.array([0.0, 1.0, 3.0])
  zero = np.zeros(3)
  expected0 = np.stack([np.cos(p), zero, np.sin(p), zero], -1)
  expected1 = np.stack([zero, np.cos(p / 10), zero, np.sin(p / 10)], -1)
  np.testing.assert_allclose(attn_lib.rope(e0, positions, 100.0)[0, :, 0], expected0, atol=1e-6)
  np.testing.assert_allclose(attn_lib.rope(e1, positions, 100.0)[0, :, 0], expected1, atol=1e-6)
  # Random vectors against the NumPy rotation.
  x = np.random.default_rng(1).normal(size=(2, 5, 3, 8))
  positions = np.array([0, 2, 5, 11, 40])
  np.testing.assert_allclose(
    attn_lib.rope(jnp.asarray(x, jnp.float32), jnp.asarray(positions), 1e4),
    np_rope(x, positions, 1e4),
    rtol=1e-5,
    atol=1e-5,
  )


def test_rope_dot_product_depends_on_relative_position_only():
  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)
  dot = lambda m, n: float(
    jnp.sum(attn_lib.rope(q, jnp.array([m]), 100.0) * attn_lib.rope(k, jnp.array([n]), 100.0))
  )
  np.testing.assert_allclose(dot(3, 1), dot(13, 11), rtol=1e-5)
  np.testing.assert_allclose(dot(0, 5), dot(20, 25), rtol=1e-5)
  assert abs(dot(3, 1) - dot(13, 1)) > 1e-2  # only one side moved: the product changes


def test_attention_matches_numpy_and_is_shift_invariant(params):
  p = jax.tree.map(lambda a: a[0], params['blocks']['attn'])
  x = np.random.default_rng(3).normal(size=(BATCH, SEQ, CFG.d_model))
  positions = np.arange(SEQ)
  attend = jax.jit(
    lambda x, pos: attn_lib.attention(x, p, pos, CFG.rope_base, implementation='xla')
  )
  x32 = jnp.asarray(x, jnp.float32)
  out = attend(x32, jnp.asarray(positions))
  assert_trees_close(out, np_attention(x, params_np(p), positions, CFG.rope_base), rtol=1e-5)
  # RoPE on both q and k makes scores depend on i - j only: shifting every position is a no-op.
  shifted = attend(x32, jnp.asarray(positions + 17))
  assert_trees_close(shifted, out, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Router statistics.
# ---------------------------------------------------------------------------------------------


def test_router_z_and_aux_loss_against_numpy():
  # Logits far from logsumexp 1 (here about 4 to 6), so a missing square is a large error.
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(2, 5, 3)) * 1.5 + 4.0  # [G, S, E]
  x = jnp.asarray(np.eye(5)[None].repeat(2, 0), jnp.float32)  # one-hot tokens, D = S = 5
  # Group g's router logits are logits[g]: a router weight per group, so route one at a time.
  stats = [
    moe.routing_stats(moe.router(x[g : g + 1], jnp.asarray(logits[g], jnp.float32), 2), 3)
    for g in range(2)
  ]
  z = sum(float(s['z_loss_sum']) for s in stats)
  aux = sum(float(s['aux_loss_sum']) for s in stats)
  np.testing.assert_allclose(z, np.sum(np_logsumexp(logits) ** 2), rtol=1e-5)
  expected_aux = 0.0
  for g in range(2):
    probs = np_softmax(logits[g])
    top2 = np.argsort(-probs, axis=-1)[:, :2]
    f = np.bincount(top2.ravel(), minlength=3) / (5 * 2)
    expected_aux += 3 * np.sum(f * probs.mean(0))
  np.testing.assert_allclose(aux, expected_aux, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Whole model (this also covers the module call `model(tokens)`).
# ---------------------------------------------------------------------------------------------


def test_model_forward_and_loss_match_numpy(model, params, batch):
  """Logits, routing statistics (capacity drops included) and the loss against NumPy."""
  tokens, targets = batch[:, :-1], batch[:, 1:]
  logits, stats = jax.jit(lambda t: model(t))(tokens)
  expected, np_stats = np_forward(CFG, params, tokens)
  assert 0 < np_stats['dropped'] < BATCH * SEQ * CFG.top_k * CFG.num_layers  # some drops
  assert_trees_close(logits, expected, rtol=1e-4)
  np.testing.assert_array_equal(stats['dropped'], np_stats['dropped'])
  np.testing.assert_array_equal(stats['expert_counts'], np_stats['counts'])
  np.testing.assert_allclose(stats['z_loss_sum'], np_stats['z'], rtol=1e-5)
  np.testing.assert_allclose(stats['aux_loss_sum'], np_stats['aux'], rtol=1e-5)

  loss, metrics = model_lib.finalize_loss(
    CFG, model_lib.cross_entropy_sum(logits, targets), stats, BATCH, SEQ
  )
  logp = expected - np_logsumexp(expected)[..., None]
  ce = -np.mean(np.take_along_axis(logp, np.asarray(targets)[..., None], -1))
  z = np_stats['z'] / (BATCH * SEQ * CFG.num_layers)  # mean over tokens and layers
  aux = np_stats['aux'] / (BATCH * CFG.num_layers)  # mean over sequences and layers
  np.testing.assert_allclose(metrics['z_loss'], z, rtol=1e-5)
  np.testing.assert_allclose(metrics['aux_loss'], aux, rtol=1e-5)
  np.testing.assert_allclose(loss, ce + CFG.aux_loss_coef * aux + CFG.z_loss_coef * z, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Expert dropout.
# ---------------------------------------------------------------------------------------------


def test_dropout_forward_matches_numpy_with_per_layer_keys(params, batch):
  """Dropout bits: layer l from fold_in(key, l), block (g, e) from fold_in(fold_in(., g), e)."""
  cfg = dataclasses.replace(CFG, expert_dropout=0.5)
  tokens = batch[:, :-1]
  key = jax.random.key(11)
  fwd = jax.jit(lambda t, k: model_lib.forward(cfg, params, t, k)[0])
  dropped_out = fwd(tokens, key)
  cap = moe.capacity(SEQ, cfg.top_k, cfg.num_experts, cfg.capacity_factor, cfg.dropless)
  expected, _ = np_forward(cfg, params, tokens, np_keep_bits(key, cfg, cap))
  assert_trees_close(dropped_out, expected, rtol=1e-4)
  # A forward with a dropout key differs from one without.
  plain = jax.jit(lambda t: model_lib.forward(cfg, params, t)[0])(tokens)
  assert np.max(np.abs(np.asarray(dropped_out) - np.asarray(plain))) > 1e-2


def test_dropout_blocks_differ_and_keep_one_minus_rate():
  rate, shape = 0.25, (8, 16)
  mask = np.asarray(
    moe.dropout_keep_mask(jax.random.key(5), jnp.arange(4), jnp.arange(6), shape, rate)
  )
  blocks = mask.reshape(4 * 6, -1)  # one row per (group, expert)
  same = [
    (i, j) for i in range(len(blocks)) for j in range(i) if np.array_equal(blocks[i], blocks[j])
  ]
  assert not same, f'{len(same)} pairs of (group, expert) blocks have identical masks: {same[:5]}'
  # Bernoulli(0.75) over 3072 bits: standard deviation 0.0078; allow 5 of them.
  assert abs(mask.mean() - (1 - rate)) < 0.04, mask.mean()


def test_layers_get_different_dropout_masks():
  keys = model_lib.layer_keys(jax.random.key(5), 3)
  masks = [
    np.asarray(moe.dropout_keep_mask(k, jnp.arange(2), jnp.arange(2), (4, 8), 0.5)) for k in keys
  ]
  for i in range(3):
    for j in range(i):
      assert not np.array_equal(masks[i], masks[j]), f'layers {i} and {j} share a dropout mask'


# ---------------------------------------------------------------------------------------------
# Optimizer.
# ---------------------------------------------------------------------------------------------

TRAIN = TrainConfig(
  steps=10,
  learning_rate=0.1,
  warmup_steps=4,
  end_lr_ratio=0.1,
  b1=0.9,
  b2=0.95,
  eps=1e-8,
  weight_decay=0.1,
  grad_clip=1.0,
  log_every=1,
  eval_every=1,
  eval_steps=1,
  checkpoint_every=1,
  keep_checkpoints=1,
)
DECAYED = {
  "['embed']",
  "['unembed']",
  "['blocks']['attn']['wq']",
  "['blocks']['attn']['wk']",
  "['blocks']['attn']['wv']",
  "['blocks']['attn']['wo']",
  "['blocks']['moe']['router']",
  "['blocks']['moe']['w_in']",
  "['blocks']['moe']['w_out']",
}
NOT_DECAYED = {
  "['blocks']['attn_norm']['scale']",
  "['blocks']['mlp_norm']['scale']",
  "['final_norm']['scale']",
}


def _by_path(tree) -> dict:
  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_decay_mask_spares_norm_scales_and_biases(params):
  mask = _by_path(train_lib.decay_mask(params))
  assert set(mask) == DECAYED | NOT_DECAYED
  wrong = {k: v for k, v in mask.items() if v != (k in DECAYED)}
  assert not wrong, f'wrong weight-decay flags (True = decayed): {wrong}'
  other = {'dense': {'kernel': 1.0, 'bias': 1.0}, 'layer_norm': {'scale': 1.0}}
  assert train_lib.decay_mask(other) == {
    'dense': {'kernel': True, 'bias': False},
    'layer_norm': {'scale': False},
  }


def test_optimizer_steps_match_numpy_adamw(params):
  """Three updates of make_optimizer against NumPy: clipping, Adam, masked decay, warmup lr."""
  tx = train_lib.make_optimizer(TRAIN)
  rng = np.random.default_rng(6)
  p = params_np(params)
  flat, treedef = jax.tree.flatten(p)
  grads = []
  for norm in (0.5, 0.8, 3.0):  # the last one is clipped to global norm 1
    g = [rng.normal(size=a.shape) for a in flat]
    total = math.sqrt(sum(np.sum(x * x) for x in g))
    grads.append([x * norm / total for x in g])
  decay = [k in DECAYED for k in _by_path(p)]

  update = jax.jit(tx.update)
  state = tx.init(params)
  cur = jax.tree.map(jnp.asarray, params)
  mu = [np.zeros_like(a) for a in flat]
  nu = [np.zeros_like(a) for a in flat]
  b1, b2, eps, wd = TRAIN.b1, TRAIN.b2, TRAIN.eps, TRAIN.weight_decay
  for t, g in enumerate(grads):
    updates, state = update(
      jax.tree.unflatten(treedef, [jnp.asarray(x, jnp.float32) for x in g]), state, cur
    )
    lr = TRAIN.learning_rate * t / TRAIN.warmup_steps  # linear warmup from 0
    norm = math.sqrt(sum(np.sum(x * x) for x in g))
    g = [x * min(1.0, TRAIN.grad_clip / norm) for x in g]
    expected = []
    for i, x in enumerate(g):
      mu[i] = b1 * mu[i] + (1 - b1) * x
      nu[i] = b2 * nu[i] + (1 - b2) * x * x
      m_hat, v_hat = mu[i] / (1 - b1 ** (t + 1)), nu[i] / (1 - b2 ** (t + 1))
      u = m_hat / (np.sqrt(v_hat) + eps) + (wd * flat[i] if decay[i] else 0.0)
      expected.append(-lr * u)
    assert_trees_close(updates, jax.tree.unflatten(treedef, expected), rtol=1e-5, atol=1e-8)
    flat = [a + u for a, u in zip(flat, expected, strict=True)]
    cur = optax.apply_updates(cur, updates)
