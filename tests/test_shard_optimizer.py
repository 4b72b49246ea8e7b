"""parallel.shard_optimizer (mas_jax/zero.py): the same training, the state split over devices.

Every strategy's sharded step equals its unsharded one (losses and parameters); a 20-step
ma_sep run logs the same losses; checkpoints move between the two layouts both ways; each
device holds 1/16 of the state; a mesh that no axis of some array divides is a one-line error.
"""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_close, read_metrics, tiny_config

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


def _config(strategy: str, shard: bool, **overrides) -> config_lib.Config:
  fields = {**SMALL, **PLACEMENTS[strategy], **overrides}
  cd = tiny_config(**fields, **{'parallel.strategy': strategy, 'parallel.shard_optimizer': shard})
  return config_lib.from_config_dict(cd)


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
  return np.array(losses), jax.device_get(jax.jit(layout.to_reference)(state['params']))


@pytest.mark.parametrize(
  'strategy,shard_gradients', [('dp', True), ('ep', True), ('tp_pp', True), ('ma_sep', False)]
)
def test_sharded_step_equals_unsharded(strategy, shard_gradients):
  """(ma_sep with shard_gradients=True: the 20-step runs below.)"""
  losses, params = _train(_config(strategy, False), steps=2)
  config = _config(strategy, True, **{'parallel.shard_gradients': shard_gradients})
  sharded_losses, sharded_params = _train(config, steps=2)
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
# train_and_evaluate: 20 steps, and resuming across the two layouts (ma_sep, whose layouts differ).
# ---------------------------------------------------------------------------------------------

RUN = {
  **SMALL,
  **PLACEMENTS['ma_sep'],
  'parallel.strategy': 'ma_sep',
  'train.steps': 20,
  'train.log_every': 1,
  'train.eval_every': 10,
  'train.eval_steps': 1,
  'train.checkpoint_every': 10,
  'train.keep_checkpoints': 2,
  'train.tensorboard': False,
}


def _run(workdir: str, sample_dir: str, shard: bool, resume_from: str | None = None):
  """The losses of a 20-step run, or of a copy of run `resume_from` resumed from step 10."""
  if resume_from is not None:
    shutil.copytree(resume_from, workdir)
    shutil.rmtree(os.path.join(workdir, 'checkpoints', '20'))
  cd = tiny_config(**RUN, **{'data.data_dir': sample_dir, 'parallel.shard_optimizer': shard})
  train_lib.train_and_evaluate(cd, workdir)
  return np.array([r['loss'] for r in read_metrics(workdir)])


@pytest.fixture(scope='module')
def runs(sample_dir, tmp_path_factory):
  root = str(tmp_path_factory.mktemp('shard_optimizer'))
  path = lambda name: os.path.join(root, name)
  return {
    'unsharded': _run(path('unsharded'), sample_dir, False),
    'sharded': _run(path('sharded'), sample_dir, True),
    # A sharded run's step-10 checkpoint resumed without sharding, and the other way round.
    'sharded_to_unsharded': _run(path('s2u'), sample_dir, False, resume_from=path('sharded')),
    'unsharded_to_sharded': _run(path('u2s'), sample_dir, True, resume_from=path('unsharded')),
    'workdirs': {name: path(name) for name in ('unsharded', 'sharded')},
  }


def test_sharded_run_logs_the_same_losses(runs):
  assert len(runs['sharded']) == 20
  np.testing.assert_allclose(runs['sharded'], runs['unsharded'], rtol=0, atol=1e-5)


@pytest.mark.parametrize('name', ['sharded_to_unsharded', 'unsharded_to_sharded'])
def test_checkpoints_resume_across_layouts(runs, name):
  losses = runs[name]
  assert len(losses) == 20
  np.testing.assert_allclose(losses, runs['unsharded'], rtol=0, atol=1e-5)


def test_generation_restores_a_sharded_run(runs):
  """generate_lib reads a sharded run's checkpoint (reference layout) like an unsharded one's."""
  sharded, step = generate_lib.restore_params(runs['workdirs']['sharded'])
  unsharded, _ = generate_lib.restore_params(runs['workdirs']['unsharded'])
  assert step == 20
  assert_trees_close(sharded, unsharded, rtol=1e-4, atol=1e-6)
  assert jax.tree.leaves(jax.tree.map(jnp.shape, sharded)) == jax.tree.leaves(
    jax.tree.map(jnp.shape, unsharded)
  )


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
