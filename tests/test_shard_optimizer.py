"""parallel.shard_optimizer (mas_jax/zero.py): the same training, the state split over devices.

Every strategy's sharded step equals its unsharded one (losses and parameters); 20 ma_sep steps
log the same losses with either shard_gradients; checkpoints restore across the two layouts both
ways, and generation reads a sharded run's; each device holds 1/16 of the state; a mesh that no
axis of some array divides is a one-line error.
"""

import os

import jax
import numpy as np
import pytest
from conftest import assert_trees_close, tiny_config

from mas_jax import checkpoint as checkpoint_lib
from mas_jax import config as config_lib
from mas_jax import generate_lib, strategies, train_lib, zero
from mas_jax.config import ConfigError

pytestmark = pytest.mark.timeout(600)

# One placement per strategy, each with gradient accumulation (the reduce-scatter per chunk).
PLACEMENTS = {
  'dp': {},
  'ep': {'parallel.ep': 8},
  'tp_pp': {'parallel.tp': 8, 'parallel.pp': 2, 'parallel.num_microbatches': 2},
  'ma_sep': {'parallel.num_microbatches': 2},
}
SMALL = {'data.seq_len': 16, 'data.batch_size': 32, 'train.grad_accum_steps': 2}


def _config_dict(strategy: str, **overrides):
  fields = {**SMALL, **PLACEMENTS[strategy], **overrides}
  return tiny_config(**fields, **{'parallel.strategy': strategy})


def _config(strategy: str, shard: bool | None = None, **overrides) -> config_lib.Config:
  if shard is not None:
    overrides['parallel.shard_optimizer'] = shard
  return config_lib.from_config_dict(_config_dict(strategy, **overrides))


def _train(config: config_lib.Config, steps: int):
  """(losses, params in the reference layout) after `steps` steps on fixed random batches."""
  strategy = strategies.get(config)
  tx = train_lib.make_optimizer(config.train)
  layout = zero.ParamLayout(config, strategy)
  state, shardings = train_lib.create_train_state(layout, tx)
  step = train_lib.compile_train_step(config, layout, tx, shardings, state)
  rng = np.random.default_rng(0)
  shape = (config.data.batch_size, config.data.seq_len + 1)
  losses = []
  for _ in range(steps):
    batch = rng.integers(0, config.model.vocab_size, shape, np.int32)
    state, metrics = step(state, jax.device_put(batch, strategy.batch_sharding()))
    losses.append(float(metrics['loss']))
  params = jax.device_get(jax.jit(layout.to_reference)(state['params']))
  return np.array(losses), params, state, layout


@pytest.mark.parametrize('strategy,shard_gradients', [('dp', True), ('ep', True), ('tp_pp', True)])
def test_sharded_step_equals_unsharded(strategy, shard_gradients):
  """(ma_sep: the 20-step runs below, with either shard_gradients.)"""
  losses, params, _, _ = _train(_config(strategy, False), steps=2)
  config = _config(strategy, True, **{'parallel.shard_gradients': shard_gradients})
  sharded_losses, sharded_params, _, _ = _train(config, steps=2)
  np.testing.assert_allclose(sharded_losses, losses, rtol=1e-6)
  assert_trees_close(sharded_params, params, rtol=1e-5, atol=1e-7)


def test_state_is_split_over_all_devices():
  """Master weights and both moments: 1/16 of every array on every device, for every strategy."""
  for strategy in PLACEMENTS:
    config = _config(strategy, True)
    layout = zero.ParamLayout(config, strategies.get(config))
    tx = train_lib.make_optimizer(config.train)
    state = train_lib.abstract_state(layout, tx)
    arrays = jax.tree.leaves({'params': state['params'], 'opt_state': state['opt_state']})
    sharded = [a for a in arrays if a.ndim > 0]
    assert len(sharded) == 3 * len(jax.tree.leaves(layout.abstract())), strategy
    for a in sharded:
      assert np.prod(a.sharding.shard_shape(a.shape)) * 16 == a.size, (strategy, a.shape)


def test_ma_sep_state_has_no_dummy_slots():
  """Sharded, ma_sep's state is the reference layout: 16 experts, not 12 x 4 dummy + 16 slots."""
  config = _config('ma_sep', True)
  layout = zero.ParamLayout(config, strategies.get(config))
  assert layout.abstract()['blocks']['moe']['w_in'].shape[1] == config.model.num_experts
  unsharded = zero.ParamLayout(_config('ma_sep', False), strategies.get(config))
  assert unsharded.abstract()['blocks']['moe']['w_in'].shape[1] == 16 * 4


def test_an_array_no_axis_of_which_divides_is_a_one_line_error():
  config = _config('dp', True, **{'data.batch_size': 24, 'train.grad_accum_steps': 1})
  with pytest.raises(ConfigError, match=r'no axis of params\.\S+ \[.*\] divides over 12 devices'):
    zero.ParamLayout(config, strategies.get(config, jax.devices()[:12]))


def test_zero_spec_prefers_the_axis_the_strategy_splits():
  mesh = jax.make_mesh((4, 4), ('a', 'b'))
  P = jax.sharding.PartitionSpec
  assert zero.zero_spec('w', (2, 16, 64, 128), P(None, ('a', 'b')), mesh) == P(None, ('a', 'b'))
  # Not divisible there (8 heads): the largest axis that divides.
  assert zero.zero_spec('w', (2, 64, 8, 32), P(None, None, 'a'), mesh) == P(None, ('a', 'b'))


# ---------------------------------------------------------------------------------------------
# ma_sep, whose two layouts differ: 20 steps, checkpoints across the layouts, generation.
# ---------------------------------------------------------------------------------------------

STEPS = 20
MA_SEP_RUNS = {
  'unsharded': {'parallel.shard_optimizer': False},
  'zero2': {'parallel.shard_optimizer': True},
  'zero1': {'parallel.shard_optimizer': True, 'parallel.shard_gradients': False},
}


@pytest.fixture(scope='module')
def ma_sep_runs():
  """(losses, reference-layout params, final state, layout) of 20 steps of each variant."""
  return {name: _train(_config('ma_sep', **flags), STEPS) for name, flags in MA_SEP_RUNS.items()}


@pytest.mark.parametrize('name', ['zero2', 'zero1'])
def test_sharded_ma_sep_logs_the_same_losses_for_20_steps(ma_sep_runs, name):
  losses, params, _, _ = ma_sep_runs[name]
  expected_losses, expected_params, _, _ = ma_sep_runs['unsharded']
  assert len(losses) == STEPS
  np.testing.assert_allclose(losses, expected_losses, rtol=0, atol=1e-5)
  assert_trees_close(params, expected_params, rtol=1e-4, atol=1e-6)


def _save(directory: str, state: dict) -> None:
  mgr = checkpoint_lib.manager(directory, keep=1)
  checkpoint_lib.save(mgr, state, {})
  checkpoint_lib.wait(mgr)
  mgr.close()


@pytest.mark.parametrize('source,target', [('zero2', 'unsharded'), ('unsharded', 'zero2')])
def test_checkpoints_restore_across_the_layouts(ma_sep_runs, tmp_path, source, target):
  """A checkpoint of either layout restores into the other exactly (train_lib.restore, as a
  resume with the flag changed does): parameters and both moments, dummy slots dropped or
  re-added as zeros."""
  _, _, state, source_layout = ma_sep_runs[source]
  target_layout = ma_sep_runs[target][3]
  _save(str(tmp_path), state)
  tx = train_lib.make_optimizer(target_layout.config.train)
  mgr = checkpoint_lib.manager(str(tmp_path), keep=1)
  restored, _, step = train_lib.restore(mgr, target_layout, tx, str(tmp_path))
  mgr.close()
  assert step == STEPS
  expected = jax.jit(lambda s: target_layout.convert_state(s, source_layout))(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  back = jax.jit(lambda s: source_layout.convert_state(s, target_layout))(restored)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_generation_restores_a_sharded_run(ma_sep_runs, tmp_path):
  """generate_lib reads a sharded run's checkpoint (reference layout) as the run's parameters."""
  _, params, state, layout = ma_sep_runs['zero2']
  workdir = str(tmp_path)
  _save(os.path.join(workdir, 'checkpoints'), state)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(_config_dict('ma_sep', **MA_SEP_RUNS['zero2']).to_json_best_effort())
  restored, step = generate_lib.restore_params(workdir)
  assert step == STEPS
  assert_trees_close(restored, params, rtol=0, atol=0)


@pytest.mark.parametrize('strategy', list(PLACEMENTS))
def test_planner_state_bytes_equal_the_sharded_state(strategy):
  """The planner's parameters + moments per device (`shard_optimizer_memory`) against the bytes
  one device holds of the sharded state, and every role's efficiency 1."""
  from mas_jax import perf

  config = _config(strategy, True)
  layout = zero.ParamLayout(config, strategies.get(config))
  state = train_lib.abstract_state(layout, train_lib.make_optimizer(config.train))
  held = sum(
    int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize
    for a in jax.tree.leaves({'params': state['params'], 'opt_state': state['opt_state']})
    if a.ndim > 0
  )
  prediction = perf.predict_config(config, perf.HARDWARE['h100'], 16)
  for role, memory in prediction.memory_by_role.items():
    assert memory.state == pytest.approx(held, rel=0.01), role
    assert memory.efficiency == 1.0, role
