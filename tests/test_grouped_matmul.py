"""Grouped-matmul experts: the Mosaic-GPU VJP wiring, and every expert impl against the einsum.

The Hopper kernels cannot run on CPU; their custom VJP is checked here with `lax.ragged_dot`
stand-ins that have the kernels' signatures (`bench/grouped_matmul.py --smoke` uses the same),
and the kernels themselves against `lax.ragged_dot` on the GPU by bench/grouped_matmul.py.
"""

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mas_jax import config as config_lib
from mas_jax import model as model_lib
from mas_jax.layers import grouped_matmul as gmm_lib
from mas_jax.layers import moe

sys.path.insert(0, 'bench')

import grouped_matmul as gmm_bench  # noqa: E402

from configs import tiny  # noqa: E402


def _operands(sizes, k=128, n=256):
  keys = jax.random.split(jax.random.key(0), 3)
  m = int(sum(sizes))
  lhs = jax.random.normal(keys[0], (m, k), jnp.float32)
  rhs = jax.random.normal(keys[1], (len(sizes), k, n), jnp.float32)
  dout = jax.random.normal(keys[2], (m, n), jnp.float32)
  return lhs, rhs, dout, jnp.asarray(sizes, jnp.int32)


@pytest.mark.parametrize('sizes', [(5, 0, 9, 3), (8, 8), (13,)])
def test_mosaic_vjp_matches_ragged_dot(sizes):
  """Forward and both gradients of the custom VJP (uneven, empty and unaligned groups)."""
  lhs, rhs, dout, group_sizes = _operands(sizes)

  def vjp(impl):
    f = lambda a, b: gmm_lib.gmm(
      a,
      b,
      group_sizes,
      impl,
      tilings=gmm_lib.tilings_for(128, 256),
      kernels=gmm_bench.reference_kernels(),
    )
    out, pull = jax.vjp(f, lhs, rhs)
    return (out, *pull(dout))

  for got, want in zip(vjp('mosaic_gpu'), vjp('xla'), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # And against per-group dense matmuls.
  out = vjp('xla')[0]
  start = 0
  for g, size in enumerate(sizes):
    np.testing.assert_allclose(
      out[start : start + size], lhs[start : start + size] @ rhs[g], rtol=1e-5, atol=1e-4
    )
    start += size


def test_one_group_is_a_dense_matmul():
  """One group runs jnp.dot for every impl, without the kernels or their tiling rules."""

  def unused(*args, **kwargs):
    raise AssertionError('a kernel ran for one group')

  lhs, rhs, _, sizes = _operands((13,), k=96, n=40)  # widths no Mosaic tiling takes
  for impl in gmm_lib.IMPLS:
    out = gmm_lib.gmm(lhs, rhs, sizes, impl, kernels=gmm_lib.Kernels(unused, unused))
    np.testing.assert_allclose(out, lhs @ rhs[0], rtol=1e-6)


def test_mosaic_shape_errors_name_the_numbers():
  with pytest.raises(ValueError, match=r'k=96 is not a multiple of the forward block_k=64'):
    gmm_lib.check_shapes(8, 96, 128, *gmm_lib.DEFAULT_TILINGS)
  # Small models fall back to the default tiles where the tuned ones do not fit.
  assert gmm_lib.tilings_for(4096, 16384) == gmm_lib.WIDENING_TILINGS
  assert gmm_lib.tilings_for(16384, 4096) == gmm_lib.NARROWING_TILINGS
  assert gmm_lib.tilings_for(2048, 4096) == gmm_lib.WIDENING_TILINGS
  assert gmm_lib.tilings_for(256, 512) == gmm_lib.DEFAULT_TILINGS
  assert gmm_lib.tilings_for(128, 128) == gmm_lib.DEFAULT_TILINGS
  # The forward kernel's CTA spans two warpgroups' block_n columns.
  with pytest.raises(ValueError, match=r'n=384 is not a multiple of 2\*block_n\*grid_block_n=256'):
    gmm_lib.check_shapes(8, 128, 384, gmm_lib.Tiling(), *gmm_lib.DEFAULT_TILINGS[1:])


@pytest.mark.parametrize('dropless', [False, True])
def test_grouped_experts_match_einsum(dropless):
  """Same routing, drops, outputs and gradients as the capacity einsum (with dropped tokens)."""
  keys = jax.random.split(jax.random.key(3), 4)
  g, s, d, e, f, k = 2, 24, 16, 4, 32, 2
  x = jax.random.normal(keys[0], (g, s, d), jnp.float32)
  params = {
    'router': jax.random.normal(keys[1], (d, e)) * 2.0,
    'w_in': jax.random.normal(keys[2], (e, d, f)) / d**0.5,
    'w_out': jax.random.normal(keys[3], (e, f, d)) / f**0.5,
  }
  cap = moe.capacity(s, k, e, 0.5, dropless)

  def run(impl):
    def loss(x, p):
      y, stats = moe.moe_ffn(x, p, top_k=k, cap=cap, activation='gelu', impl=impl)
      return jnp.sum(y * jnp.cos(y)), stats

    # Jitted: one compile, instead of one per operation of an eager run.
    (val, stats), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(x, params)
    return val, stats, grads

  want_val, want_stats, want_grads = run('einsum')
  got_val, got_stats, got_grads = run('ragged_dot')
  assert (float(want_stats['dropped']) > 0) == (not dropless)
  np.testing.assert_allclose(got_val, want_val, rtol=1e-5)
  np.testing.assert_array_equal(got_stats['dropped'], want_stats['dropped'])
  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('dropless', [False, True])
def test_rows_past_the_groups_are_never_read(monkeypatch, dropless):
  """The grouped kernels under capacity and dropless routing: the dropped pairs sort past the
  groups' total, where the Hopper kernels leave whatever the buffer held. Stand-ins that leave
  NaN there give the einsum's outputs and gradients (nothing reads those rows, in either pass),
  and the kernels see the kept pairs only, sorted, in groups that sum to the kept count."""
  ref = gmm_bench.reference_kernels()
  seen = []

  def forward(lhs, rhs, *, group_sizes, **kw):
    record = lambda sizes, rows=lhs.shape[0]: seen.append((np.asarray(sizes), rows))
    jax.debug.callback(record, group_sizes)
    out = ref.forward(lhs, rhs, group_sizes=group_sizes, **kw)
    past = jnp.arange(out.shape[0])[:, None] >= jnp.sum(group_sizes)
    return jnp.where(past, jnp.nan, out)

  monkeypatch.setattr(
    gmm_lib, 'mosaic_gpu_kernels', lambda rows=None: ref._replace(forward=forward)
  )
  keys = jax.random.split(jax.random.key(5), 4)
  g, s, d, e, f, k = 2, 24, 128, 4, 256, 2  # widths the default tilings take
  x = jax.random.normal(keys[0], (g, s, d), jnp.float32)
  params = {
    'router': jax.random.normal(keys[1], (d, e)) * 0.5,
    'w_in': jax.random.normal(keys[2], (e, d, f)) / d**0.5,
    'w_out': jax.random.normal(keys[3], (e, f, d)) / f**0.5,
  }
  cap = moe.capacity(s, k, e, 0.5, dropless)

  def run(impl):
    def loss(x, p):
      y, stats = moe.moe_ffn(x, p, top_k=k, cap=cap, activation='gelu', impl=impl)
      return jnp.sum(y * jnp.cos(y)), stats

    return jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(x, params)

  (want, want_stats), want_grads = run('einsum')
  (got, got_stats), got_grads = run('mosaic_gpu')
  assert (float(want_stats['dropped']) > 0) == (not dropless)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  jax.effects_barrier()
  assert seen  # the forward, then the data gradients of both matmuls
  kept = g * s * k - int(want_stats['dropped'])
  for sizes, rows in seen:
    assert rows == g * s * k and sizes.sum() == kept, (sizes, rows)


def test_model_loss_and_gradients_with_ragged_dot():
  cfg = model_lib.ModelConfig(
    vocab_size=64,
    num_layers=2,
    d_model=32,
    num_heads=4,
    num_experts=4,
    top_k=2,
    expert_hidden=16,
    capacity_factor=1.0,
  )
  params = nnx.to_pure_dict(nnx.state(model_lib.Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  batch = jax.random.randint(jax.random.key(2), (2, 17), 0, cfg.vocab_size)

  def grad(c):
    return jax.jit(jax.value_and_grad(lambda p: model_lib.loss_fn(c, p, batch)[0]))(params)

  want_loss, want = grad(dataclasses.replace(cfg, expert_impl='einsum'))
  got_loss, got = grad(dataclasses.replace(cfg, expert_impl='ragged_dot'))
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_auto_resolution_and_errors():
  assert moe.resolve_expert_impl('auto', dropless=False) == 'einsum'
  assert moe.resolve_expert_impl('auto', dropless=True) == 'ragged_dot'  # CPU
  assert moe.resolve_expert_impl('auto', dropless=True, dropout_rate=0.1) == 'einsum'
  with pytest.raises(ValueError, match='needs a Hopper'):
    moe.resolve_expert_impl('mosaic_gpu', dropless=True)

  def check(**overrides):
    cd = tiny.get_config()
    cd.model.expert_dropout = 0.0
    for dotted, value in overrides.items():
      section, field = dotted.split('__')
      cd[section][field] = value
    config_lib.validate(config_lib.from_config_dict(cd))

  check(model__expert_impl='ragged_dot')
  with pytest.raises(config_lib.ConfigError, match=r"expert_impl='magic' is not one of"):
    check(model__expert_impl='magic')
  with pytest.raises(config_lib.ConfigError, match=r"parallel.strategy='ep' runs them on"):
    check(model__expert_impl='ragged_dot', parallel__strategy='ep')
  with pytest.raises(config_lib.ConfigError, match=r'expert_dropout=0.1 needs'):
    check(model__expert_impl='ragged_dot', model__expert_dropout=0.1)
  with pytest.raises(config_lib.ConfigError, match=r'd_model=96|k=96|n=96'):
    check(model__expert_impl='mosaic_gpu', model__d_model=96, model__num_heads=4)


@pytest.mark.timeout(120)
def test_grouped_matmul_bench_smoke(tmp_path, monkeypatch):
  import json

  monkeypatch.setattr(sys, 'argv', ['grouped_matmul.py', '--smoke', '--out', str(tmp_path)])
  gmm_bench.main()
  result = json.loads((tmp_path / 'cpu_smoke_grouped_matmul.json').read_text())
  assert len(result['best']) == 6 and all(b['max_rel_error'] < 2e-2 for b in result['best'])
  impls = ('einsum', 'ragged_dot', 'mosaic_gpu')
  assert all(f'{i}_fwd_bwd_s' in r for r in result['expert_ffn'] for i in impls)
