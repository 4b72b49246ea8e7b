"""Two train-step levers: bfloat16 AdamW first moments (train.mu_dtype) and the chunked output
head + cross entropy (model.loss_chunk)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_close, tiny_config
from strategy_harness import RTOL, assert_matches_reference, run, small_config

from mas_jax import checkpoint as checkpoint_lib
from mas_jax import config as config_lib
from mas_jax import model as model_lib
from mas_jax import strategies, train_lib, zero

# One layer: the levers touch the optimizer and the head, not the blocks (compiles in seconds).
ONE_LAYER = {'model.num_layers': 1}


def _state(config):
  tx = train_lib.make_optimizer(config.train)
  layout = zero.ParamLayout(config, strategies.get(config))
  state, shardings = train_lib.create_train_state(layout, tx)
  return layout, tx, state, shardings


def _moments(state):
  adam = state['opt_state'][1][0]  # chain(clip, adamw): adamw's scale_by_adam state
  return adam.mu, adam.nu


@pytest.mark.timeout(120)
def test_bf16_moments_train_and_checkpoint_round_trip(tmp_path):
  config = config_lib.from_config_dict(
    tiny_config(
      **ONE_LAYER,
      **{'train.mu_dtype': 'bfloat16', 'data.seq_len': 16, 'data.batch_size': 4},
    )
  )
  layout, tx, state, shardings = _state(config)
  step = train_lib.make_train_step(config, layout, tx, shardings)
  batch = np.random.default_rng(0).integers(0, 512, (4, 17), dtype=np.int32)
  for _ in range(3):
    state, metrics = step(state, batch)
  mu, nu = _moments(state)
  assert {a.dtype for a in jax.tree.leaves(mu)} == {jnp.dtype(jnp.bfloat16)}
  assert {a.dtype for a in jax.tree.leaves(nu)} == {jnp.dtype(jnp.float32)}  # optax: no option
  assert np.isfinite(float(metrics['loss']))
  assert float(jnp.max(jnp.abs(mu['unembed']))) > 0  # the moments really moved

  mgr = checkpoint_lib.manager(str(tmp_path / 'checkpoints'), keep=1)
  checkpoint_lib.save(mgr, state, {'shard': 0})
  checkpoint_lib.wait(mgr)
  restored, data, saved_step = checkpoint_lib.restore_latest_good(
    mgr, train_lib.abstract_state(layout, tx), str(tmp_path)
  )
  mgr.close()
  assert saved_step == 3 and data == {'shard': 0}
  assert jax.tree.map(lambda a: a.dtype, restored) == jax.tree.map(lambda a: a.dtype, state)
  assert_trees_close(restored, state, rtol=0.0)

  # The start-up memory lines count 10 bytes of state per parameter, not 12.
  assert config.train.state_bytes_per_param == 10
  assert dataclasses.replace(config.train, mu_dtype='float32').state_bytes_per_param == 12


@pytest.mark.timeout(120)
def test_chunked_loss_equals_unchunked_reference():
  """Loss and gradients of the tiny model (fp32) with the head in chunks of 24 tokens (256
  tokens: ten full chunks and a padded one), against no chunks."""
  (loss, _), grads = run(small_config(**ONE_LAYER), dropout=False)
  (c_loss, _), c_grads = run(small_config(**ONE_LAYER, **{'model.loss_chunk': 24}), dropout=False)
  assert_trees_close(c_loss, loss, RTOL)
  assert_trees_close(c_grads, grads, RTOL)


@pytest.mark.timeout(120)
def test_chunked_loss_equals_unchunked_bf16_and_eval():
  """bf16 compute: the chunks' gradient matmuls accumulate dw in float32 where autodiff's one
  matmul rounds once, so only bf16 agreement is asked; without differentiation (evaluation) the
  custom VJP's primal gives the same loss. One chunk larger than the 64 tokens."""
  config = config_lib.from_config_dict(
    tiny_config(**ONE_LAYER, **{'model.compute_dtype': 'bfloat16'})
  )
  params = train_lib.init_params(config)
  batch = jax.random.randint(jax.random.key(1), (4, 17), 0, config.model.vocab_size)
  chunked = dataclasses.replace(config.model, loss_chunk=1000)

  def value_and_grad(cfg):
    return jax.jit(jax.value_and_grad(lambda p: model_lib.loss_fn(cfg, p, batch)[0]))(params)

  loss, grads = value_and_grad(config.model)
  c_loss, c_grads = value_and_grad(chunked)
  assert_trees_close(c_loss, loss, 1e-5)
  assert_trees_close(c_grads, grads, 1e-2)
  assert_trees_close(
    jax.jit(model_lib.loss_fn, static_argnums=0)(chunked, params, batch)[0], loss, 1e-5
  )


TP_PP = {'parallel.strategy': 'tp_pp', 'parallel.tp': 2, 'parallel.pp': 2}


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
  'overrides',
  [
    {'parallel.strategy': 'dp'},
    {'parallel.strategy': 'ep', 'parallel.ep': 4},
    {**TP_PP, 'model.num_layers': 2, 'parallel.num_microbatches': 2},
    {
      **TP_PP,
      'model.num_layers': 2,
      'parallel.num_microbatches': 2,
      'parallel.pp_schedule': '1f1b',
    },
    # 64 tokens per device: two chunks of 24 and a padded one.
    {
      'parallel.strategy': 'ma_sep',
      'parallel.attn_devices': 2,
      'parallel.moe_devices': 2,
      'parallel.num_microbatches': 2,
    },
  ],
  ids=['dp', 'ep', 'tp_pp_gpipe', 'tp_pp_1f1b', 'ma_sep'],
)
def test_chunked_loss_under_parallel_strategies_matches_reference(overrides):
  """dp (through model.loss_sums), ep, tp_pp (their own heads; 1f1b's per tick) and ma_sep (its
  token-split head) with chunks of 24 tokens on 4 devices, inside their shard_maps (the
  replicated head weight's gradient is psum-ed by the transpose of its cast to device-varying)."""
  config = small_config(**{**ONE_LAYER, 'model.loss_chunk': 24, **overrides})
  assert_matches_reference(config, devices=jax.devices()[:4], dropout=False)


@pytest.mark.parametrize(
  'overrides, message',
  [
    ({'model.loss_chunk': -1}, 'model.loss_chunk=-1 must be an integer >= 0'),
    ({'train.mu_dtype': 'float16'}, "train.mu_dtype='float16' is not one of"),
  ],
)
def test_bad_lever_values(overrides, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.from_config_dict(tiny_config(**overrides))
