"""Reference model and router: causality and routing cases computed by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mas_jax import model as model_lib
from mas_jax.config import ModelConfig
from mas_jax.layers import moe

CFG = ModelConfig(
  vocab_size=64,
  num_layers=2,
  d_model=32,
  num_heads=4,
  num_experts=4,
  top_k=2,
  expert_hidden=16,
  dropless=True,
)


@pytest.fixture(scope='module')
def params():
  return nnx.to_pure_dict(nnx.state(model_lib.Transformer(CFG, rngs=nnx.Rngs(0)), nnx.Param))


def test_causality(params):
  """Changing token t never changes the logits of positions < t (dropless routing)."""
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, CFG.vocab_size)
  changed = tokens.at[:, 7:].set((tokens[:, 7:] + 5) % CFG.vocab_size)
  fwd = jax.jit(lambda t: model_lib.forward(CFG, params, t)[0])
  a, b = fwd(tokens), fwd(changed)
  np.testing.assert_array_equal(a[:, :7], b[:, :7])
  assert not np.allclose(a[:, 7:], b[:, 7:])


def test_router_selection_and_gates():
  # 3 tokens, 4 experts; token s's logits are row s of w (the input is one-hot).
  probs = np.array([[0.1, 0.6, 0.2, 0.1], [0.4, 0.1, 0.1, 0.4], [0.05, 0.05, 0.3, 0.6]])
  x = jnp.eye(3, 4, dtype=jnp.float32)[None]  # [1, 3, 4] with D = 4
  w = jnp.zeros((4, 4)).at[:3].set(jnp.log(probs))
  route = moe.router(x, w, top_k=2)
  np.testing.assert_allclose(route['probs'][0], probs, rtol=1e-6)
  np.testing.assert_array_equal(route['experts'][0], [[1, 2], [0, 3], [3, 2]])
  np.testing.assert_allclose(
    route['gates'][0], [[0.75, 0.25], [0.5, 0.5], [2 / 3, 1 / 3]], rtol=1e-6
  )
  np.testing.assert_allclose(jnp.sum(route['gates'], -1), 1.0, rtol=1e-6)


def test_capacity_drops_in_switch_order():
  # 4 tokens all choosing expert 0 first and expert 1 second; capacity 3 per expert.
  experts = jnp.array([[[0, 1], [0, 1], [0, 1], [0, 1]]])
  pos = moe.dispatch_positions(experts, num_experts=2)
  # Choices of the same expert are queued token by token; the 4th token overflows both.
  np.testing.assert_array_equal(pos[0], [[0, 0], [1, 1], [2, 2], [3, 3]])
  # First choices take precedence over second choices of other experts' queues:
  experts = jnp.array([[[1, 0], [0, 1], [0, 1]]])
  pos = moe.dispatch_positions(experts, num_experts=2)
  # expert 0: first choices of tokens 1, 2 (slots 0, 1), then token 0's second choice (slot 2).
  np.testing.assert_array_equal(pos[0], [[0, 2], [0, 1], [1, 2]])
  assert moe.capacity(64, 2, 16, 1.25, dropless=False) == 10
  assert moe.capacity(30, 2, 16, 1.25, dropless=False) == 5  # ceil(4.6875): rounds up
  assert moe.capacity(8, 2, 2, 1.5, dropless=False) == 8  # never more than seq_len
  assert moe.capacity(64, 2, 16, 1.25, dropless=True) == 64


def test_dispatch_combine_and_dropped_count():
  x = jnp.arange(1, 5, dtype=jnp.float32).reshape(1, 4, 1) * jnp.ones((1, 4, 2))  # [1, 4, 2]
  experts = jnp.array([[[0, 1], [0, 1], [0, 1], [1, 0]]])
  gates = jnp.full((1, 4, 2), 0.5)
  pos = moe.dispatch_positions(experts, 2)
  buf = moe.dispatch(x, experts, pos, num_experts=2, cap=2)  # [1, 2, 2, 2]
  np.testing.assert_array_equal(buf[0, :, :, 0], [[1, 2], [4, 1]])  # expert 0: t0,t1; 1: t3,t0
  out = moe.combine(buf, experts, pos, gates)  # identity experts
  # t0 kept twice -> 1; t1 kept once (1st choice) -> 0.5*2; t2 dropped twice -> 0; t3 once -> 2.
  np.testing.assert_allclose(out[0, :, 0], [1.0, 1.0, 0.0, 2.0])
  assert int(jnp.sum(pos >= 2)) == 4


def _scatter_dispatch(x, experts, pos, num_experts, cap):
  """The scatter-add dispatch that `moe.dispatch` replaced: autodiff transposes it itself."""
  g, s, k = experts.shape
  gi = jnp.broadcast_to(jnp.arange(g)[:, None, None], (g, s, k))
  xk = jnp.broadcast_to(x[:, :, None, :], (g, s, k, x.shape[-1]))
  buf = jnp.zeros((g, num_experts, cap, x.shape[-1]), x.dtype)
  return buf.at[gi, experts, pos].add(xk, mode='drop')


def _gather_combine(y, experts, pos, gates):
  """The plain-indexing combine that `moe.combine` replaced."""
  g, s, k = experts.shape
  gi = jnp.broadcast_to(jnp.arange(g)[:, None, None], (g, s, k))
  kept = pos < y.shape[2]
  out = y[gi, experts, jnp.where(kept, pos, 0)]
  return jnp.einsum('GSKD,GSK->GSD', out, jnp.where(kept, gates, 0.0))


@pytest.mark.parametrize('expert_major', [False, True])
def test_dispatch_and_combine_gathers_equal_autodiff(expert_major):
  """Both passes of the row-gather dispatch and combine (custom VJPs) equal autodiff of the
  scatter / indexing forms, with dropped pairs (capacity 3 of 8 x 2 pairs over 3 experts)."""
  g, s, k, e, d, cap = 2, 8, 2, 3, 5, 3
  kx, ke, kg, kc = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(kx, (g, s, d))
  experts = jnp.argsort(jax.random.uniform(ke, (g, s, e)), axis=-1)[..., :k]
  gates = jax.random.uniform(kg, (g, s, k))
  pos = moe.dispatch_positions(experts, e)
  assert int(jnp.sum(pos >= cap)) > 0
  perm = (1, 0, 2, 3) if expert_major else (0, 1, 2, 3)

  def ours(x, gates):
    buf = moe.dispatch(x, experts, pos, e, cap, expert_major=expert_major)
    y = jnp.sin(buf) * jnp.arange(1.0, d + 1)[None, None, None]  # any per-slot function
    return moe.combine(y, experts, pos, gates, expert_major=expert_major), buf

  def plain(x, gates):
    buf = _scatter_dispatch(x, experts, pos, e, cap)
    y = jnp.sin(buf) * jnp.arange(1.0, d + 1)[None, None, None]
    return _gather_combine(y, experts, pos, gates), buf.transpose(perm)

  (out, buf), (want, want_buf) = ours(x, gates), plain(x, gates)
  np.testing.assert_array_equal(buf, want_buf)
  np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
  cot = jax.random.normal(kc, out.shape)
  grads = jax.grad(lambda *a: jnp.vdot(ours(*a)[0], cot), argnums=(0, 1))(x, gates)
  want_grads = jax.grad(lambda *a: jnp.vdot(plain(*a)[0], cot), argnums=(0, 1))(x, gates)
  for got, exp in zip(grads, want_grads, strict=True):
    np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6)


def test_expert_major_ffn_equals_grouped_layout():
  g, e, c, d, f = 2, 3, 4, 5, 6
  kx, ki, ko, km = jax.random.split(jax.random.key(1), 4)
  x = jax.random.normal(kx, (g, e, c, d))
  w_in, w_out = jax.random.normal(ki, (e, d, f)), jax.random.normal(ko, (e, f, d))
  mask = jax.random.bernoulli(km, 0.7, (g, e, c, f))
  want = moe.expert_ffn(x, w_in, w_out, 'gelu', mask, 0.3)
  got = moe.expert_ffn(jnp.swapaxes(x, 0, 1), w_in, w_out, 'gelu', mask, 0.3, expert_major=True)
  np.testing.assert_allclose(jnp.swapaxes(got, 0, 1), want, rtol=1e-5, atol=1e-5)


def test_aux_and_z_loss_values():
  probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.2, 0.7]])
  logits = np.log(probs) + 3.0  # logsumexp = 3 for every token (1 would hide a missing square)
  route = {
    'logits': jnp.asarray(logits)[None],
    'probs': jnp.asarray(probs)[None],
    'experts': jnp.array([[[0, 1], [2, 1]]]),
  }
  stats = moe.routing_stats(route, num_experts=3)
  f = np.array([1, 2, 1]) / 4
  p = probs.mean(0)
  np.testing.assert_allclose(stats['aux_loss_sum'], 3 * np.sum(f * p), rtol=1e-6)
  np.testing.assert_allclose(stats['z_loss_sum'], 2 * 3.0**2, rtol=1e-6)
  np.testing.assert_array_equal(stats['expert_counts'], [1, 2, 1])


def test_dropout_mask_is_shard_invariant():
  """A block's bits follow its global (group, expert) ids, not its place in the caller's slice."""
  key = jax.random.key(3)
  full = np.asarray(moe.dropout_keep_mask(key, jnp.arange(4), jnp.arange(6), (4, 8), 0.5))
  part = np.asarray(moe.dropout_keep_mask(key, jnp.arange(2, 4), jnp.arange(3, 6), (4, 8), 0.5))
  np.testing.assert_array_equal(full[2:, 3:], part)
  # Different ids, different bits: a mask that ignored its ids would pass the check above.
  blocks = full.reshape(4 * 6, -1)
  same = [(i, j) for i in range(24) for j in range(i) if np.array_equal(blocks[i], blocks[j])]
  assert not same, f'(group, expert) blocks with identical masks: {same[:5]}'
  assert not np.array_equal(full[:2, :3], part), 'the mask ignores the group and expert ids'


@pytest.mark.parametrize('remat', ['full', 'save_dots'])
def test_remat_keeps_loss_and_gradients(params, remat):
  import dataclasses

  batch = jax.random.randint(jax.random.key(2), (2, 9), 0, CFG.vocab_size)
  grad = lambda cfg: jax.jit(jax.grad(lambda p: model_lib.loss_fn(cfg, p, batch)[0]))(params)
  expected = grad(CFG)
  actual = grad(dataclasses.replace(CFG, remat=remat))
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-7)
