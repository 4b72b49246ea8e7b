"""Blockwise causal attention against the dense softmax(QK^T)V: values, gradients, memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_close, tiny_config

from mas_jax import config as config_lib
from mas_jax import model as model_lib
from mas_jax.layers import attention as attn_lib


def _qkv_and_cotangent(shape, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(0), 4)
  return [jax.random.normal(key, shape).astype(dtype) for key in keys]


def _value_and_grads(attend, q, k, v, do):
  """attend(q, k, v) and the gradients of <attend(q, k, v), do> w.r.t. q, k, v, in float32."""

  @jax.jit
  def run(q, k, v, do):
    out, vjp = jax.vjp(attend, q, k, v)
    return jax.tree.map(lambda x: x.astype(jnp.float32), (out, *vjp(do)))

  return run(q, k, v, do)


@pytest.mark.parametrize(
  'seq,heads,block',
  [
    (16, 1, 4),  # several blocks, T a multiple
    (16, 3, 16),  # block = T
    (13, 2, 4),  # T not a multiple: padded to 16
    (13, 2, 5),  # 3 blocks, the last one 2 rows of 5
    (20, 2, None),  # the automatic block (T)
  ],
)
def test_blockwise_equals_dense_f32(seq, heads, block):
  q, k, v, do = _qkv_and_cotangent((2, seq, heads, 8))
  blockwise = lambda q, k, v: attn_lib.blockwise_causal_attention(q, k, v, block)
  actual = _value_and_grads(blockwise, q, k, v, do)
  expected = _value_and_grads(attn_lib._dense_causal_attention, q, k, v, do)
  assert_trees_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_blockwise_equals_dense_bf16():
  q, k, v, do = _qkv_and_cotangent((2, 24, 2, 16), jnp.bfloat16)
  blockwise = lambda q, k, v: attn_lib.blockwise_causal_attention(q, k, v, 8)
  actual = _value_and_grads(blockwise, q, k, v, do)
  assert jax.eval_shape(blockwise, q, k, v).dtype == jnp.bfloat16
  # Both round probabilities to bf16 before the matmuls, at different points (per tile here):
  # a few bf16 ulps (2^-8 relative) apart.
  expected = _value_and_grads(attn_lib._dense_causal_attention, q, k, v, do)
  assert_trees_close(actual, expected, rtol=0.05, atol=0.05)


def test_block_size():
  assert [attn_lib.attention_block_size(t) for t in (1, 64, 512, 513, 1024, 2049)] == [
    1,
    64,
    512,
    257,
    512,
    410,
  ]


def test_backward_holds_no_seq_by_seq_buffer():
  """The compiled grad of the blockwise kernel holds no [B, N, T, T] float32 array; the dense
  one does (so the bound below can fail)."""
  b, t, n = 1, 2048, 2
  scores = b * n * t * t * 4  # 32 MiB
  spec = jax.ShapeDtypeStruct((b, t, n, 8), jnp.float32)

  def temporaries(attend):
    loss = lambda q, k, v: jnp.sum(attend(q, k, v))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  blockwise, dense = (
    temporaries(attn_lib.blockwise_causal_attention),
    temporaries(attn_lib._dense_causal_attention),
  )
  assert dense > scores, (dense, scores)
  assert blockwise < scores / 2, (blockwise, scores)  # measured: 8.8 MB (tiles of 512 x 512)


def test_model_loss_and_grads_equal_the_dense_path(monkeypatch):
  """loss_fn with attention_impl='xla', 3 blocks of 14 over T = 40 (the blocks made small),
  against the same model with the dense attention."""
  overrides = {'model.num_layers': 1, 'model.num_experts': 4, 'model.attention_impl': 'xla'}
  cfg = config_lib.from_config_dict(tiny_config(**overrides))
  params = model_lib.init_params(cfg)
  batch = jax.random.randint(jax.random.key(1), (2, 41), 0, cfg.model.vocab_size)
  loss_and_grad = lambda: jax.jit(
    jax.value_and_grad(lambda p: model_lib.loss_fn(cfg.model, p, batch)[0])
  )(params)
  monkeypatch.setattr(attn_lib, '_MAX_BLOCK', 16)
  actual = loss_and_grad()
  monkeypatch.setattr(
    attn_lib, 'causal_attention', lambda q, k, v, _: attn_lib._dense_causal_attention(q, k, v)
  )
  expected = loss_and_grad()
  np.testing.assert_allclose(actual[0], expected[0], rtol=1e-5)
  assert_trees_close(actual[1], expected[1], rtol=1e-5, atol=1e-7)


def test_planner_tile_equals_the_kernels_block():
  """mas_jax.perf (no JAX import) repeats the block rule; the two must agree."""
  from mas_jax.perf.model import attention_block

  for t in (1, 64, 128, 511, 512, 513, 1000, 2048, 2049, 8192):
    assert attention_block(t) == attn_lib.attention_block_size(t), t
