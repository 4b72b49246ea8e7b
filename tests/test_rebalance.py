"""ma_sep's dynamic expert re-placement (parallel.rebalance_every; mas_jax/rebalance.py).

Placement is invisible to the math: with any expert -> slot table the loss, metrics and gradients
are the reference's, and a run that re-places its experts logs the losses of one that does not
(with and without optimizer sharding); a checkpoint written after a re-placement restores
exactly, and generation reads its parameters in the reference layout.
"""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_close, tiny_config
from strategy_harness import _inputs, _reference, small_config

from mas_jax import config as config_lib
from mas_jax import generate_lib, rebalance, strategies, train_lib, zero
from mas_jax import model as model_lib
from mas_jax.perf import hlo

pytestmark = pytest.mark.timeout(300)

PERMUTATION = np.random.default_rng(1).permutation(16).astype(np.int32)


def test_lpt_placement_lowers_the_busiest_device():
  """Greedy longest-processing-time with 4 slots per device: the two hottest experts, both on
  device 0 at first, go to different devices; every slot is used once."""
  loads = np.array([8, 7, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], np.float64)
  table = rebalance.lpt_placement(loads, per_device=4)
  assert sorted(table) == list(range(16))
  assert table[0] // 4 != table[1] // 4
  before = rebalance.device_loads(loads, np.arange(16), 4)
  after = rebalance.device_loads(loads, table, 4)
  # The optimum: every device holds 4 experts, so the one with expert 0 carries 8 + 1 + 1 + 1.
  assert before.max() == 17 and after.max() == 11
  # Uniform loads: no device is busier than another whatever the table.
  uniform = rebalance.lpt_placement(np.ones(16), per_device=4)
  assert rebalance.device_loads(np.ones(16), uniform, 4).max() == 4


@pytest.mark.parametrize(
  'overrides',
  [
    {'parallel.num_microbatches': 2},
    {'parallel.attn_devices': 8, 'parallel.moe_devices': 8, 'parallel.moe_dispatch': 'replicated'},
  ],
  ids=['12_4_all_to_all', '8_8_replicated'],
)
def test_any_placement_gives_the_reference_loss_and_gradients(overrides):
  """Experts in permuted slots, with expert dropout: loss, metrics (per-expert loads too) and
  gradients equal the reference's."""
  config = small_config(**{'parallel.strategy': 'ma_sep', **overrides})
  strategy = strategies.get(config)
  params, batch = _inputs(config)
  key = jax.random.key(7)  # the harness's dropout key

  def step(reference_params, rows, placement):
    placed = strategy.from_reference(reference_params, placement)
    out, grads = strategy.value_and_grad(placed, rows, key, placement)
    return out, strategy.to_reference(grads, placement)

  out = jax.jit(step)(params, batch, jnp.asarray(PERMUTATION))
  reference = dataclasses.replace(
    config, parallel=config_lib.ParallelConfig('reference', 1, 1, 1, False, 1, 1, 1)
  )
  assert_trees_close(out, _reference(reference, True), 1e-5)


def test_the_move_is_a_permutation_between_expert_devices():
  """The compiled move of a 12:4 train state: only collective-permutes, 3 rounds of each expert
  device's own expert weights and AdamW moments (nothing gathered on every device)."""
  config = _config(**{'parallel.rebalance_every': 1})
  strategy = strategies.get(config)
  tx = train_lib.make_optimizer(config.train)
  layout = zero.ParamLayout(config, strategy)
  shardings = train_lib.state_shardings(layout, tx)
  abstract = train_lib.abstract_state(layout, tx)
  table = jax.ShapeDtypeStruct((16,), jnp.int32)
  compiled = (
    jax.jit(lambda s, t: rebalance.move_state(layout, s, t), out_shardings=shardings)
    .lower(abstract, table)
    .compile()
  )
  collectives = hlo.collectives(compiled.as_text())
  assert {c.kind for c in collectives} == {'collective-permute'}
  moe = abstract['params']['blocks']['moe']
  own = sum(a.size * 4 // 16 for a in (moe['w_in'], moe['w_out']))  # one device's slots, fp32
  assert sum(c.bytes for c in collectives) == 3 * 3 * own  # rounds x (params, mu, nu)


def _config(**overrides):
  fields = {
    'parallel.strategy': 'ma_sep',
    'parallel.num_microbatches': 2,
    'data.seq_len': 16,
    'data.source': 'synthetic',
    **overrides,
  }
  return config_lib.from_config_dict(tiny_config(**fields))


def _train(config, steps: int, table=None):
  """(losses, reference-layout params, final state) of `steps` steps on fixed batches; with
  `table`, the experts move to it after the first step (`rebalance.move_state`)."""
  strategy = strategies.get(config)
  tx = train_lib.make_optimizer(config.train)
  layout = zero.ParamLayout(config, strategy)
  state, shardings = train_lib.create_train_state(layout, tx)
  step = train_lib.compile_train_step(config, layout, tx, shardings, state)
  move = jax.jit(lambda s, t: rebalance.move_state(layout, s, t), out_shardings=shardings)
  rng = np.random.default_rng(0)
  losses = []
  for i in range(steps):
    batch = rng.integers(0, config.model.vocab_size, (16, 17), np.int32)
    state, metrics = step(state, jax.device_put(batch, strategy.batch_sharding()))
    losses.append(float(metrics['loss']))
    if i == 0 and table is not None:
      state = move(state, jnp.asarray(table))
  placement = state.get('placement')
  params = jax.jit(layout.to_reference)(state['params'], placement)
  return np.array(losses), jax.device_get(params), state


@pytest.fixture(scope='module')
def unplaced():
  return _train(_config(), steps=3)


@pytest.mark.parametrize(
  'shard_optimizer, attn_sharding', [(False, 'heads'), (True, 'heads'), (True, 'batch')]
)
def test_a_replaced_run_trains_like_one_that_is_not(unplaced, shard_optimizer, attn_sharding):
  """Experts moved to PERMUTATION after step 1 (weights and AdamW moments, or with a sharded
  optimizer only the table; also with data-parallel attention): the next steps' losses and the
  parameters are those of the unmoved run."""
  config = _config(
    **{
      'parallel.rebalance_every': 1,
      'parallel.shard_optimizer': shard_optimizer,
      'parallel.attn_sharding': attn_sharding,
    }
  )
  losses, params, state = _train(config, steps=3, table=PERMUTATION)
  np.testing.assert_array_equal(np.asarray(state['placement']), PERMUTATION)
  np.testing.assert_allclose(losses, unplaced[0], rtol=1e-6)
  assert_trees_close(params, unplaced[1], rtol=1e-5, atol=1e-7)
  # The moved moments are the unmoved run's, in the new slots.
  if not shard_optimizer:
    layout = zero.ParamLayout(config, strategies.get(config))
    mu = jax.jit(layout.to_reference)(state['opt_state'][1][0].mu, state['placement'])
    base_layout = zero.ParamLayout(_config(), strategies.get(_config()))
    base_mu = jax.jit(base_layout.to_reference)(unplaced[2]['opt_state'][1][0].mu)
    assert_trees_close(jax.device_get(mu), jax.device_get(base_mu), rtol=1e-5, atol=1e-7)


def test_the_loop_replaces_and_a_checkpoint_restores_exactly(tmp_path):
  """train.py's loop with parallel.rebalance_every=2: the busiest expert device's share never
  grows, the checkpoint written after a re-placement resumes to the uninterrupted run's metrics
  and parameters, and generation restores the parameters in the reference layout."""
  cd = tiny_config(
    **{
      'parallel.strategy': 'ma_sep',
      'parallel.rebalance_every': 2,
      'data.seq_len': 16,
      'data.source': 'synthetic',
      'train.steps': 4,
      'train.log_every': 2,
      'train.eval_every': 4,
      'train.eval_steps': 1,
      'train.checkpoint_every': 2,
      'train.tensorboard': False,
    }
  )
  full = tmp_path / 'full'
  train_lib.train_and_evaluate(cd, str(full))
  rows = [json.loads(line) for line in (full / 'metrics.jsonl').read_text().splitlines()]
  placed = [r for r in rows if 'busiest_expert_device_load_after' in r]
  gains = [
    r['busiest_expert_device_load_before'] - r['busiest_expert_device_load_after'] for r in placed
  ]
  assert len(placed) == 2 and min(gains) >= 0 and gains[0] > 0  # step 2 moved experts
  # Resume from the checkpoint of step 2, written after the step-2 re-placement: the same
  # metrics and, bit for bit, the same step-4 parameters (read back in the reference layout).
  resumed = tmp_path / 'resumed'
  shutil.copytree(full, resumed)
  shutil.rmtree(resumed / 'checkpoints' / '4')
  train_lib.train_and_evaluate(cd, str(resumed))
  again = [json.loads(line) for line in (resumed / 'metrics.jsonl').read_text().splitlines()]
  timing = ('step_time_s', 'tokens_per_sec', 'mfu')
  untimed = lambda rs: [{k: v for k, v in r.items() if k not in timing} for r in rs]  # noqa: E731
  assert untimed(again) == untimed(rows)
  for a, b in zip(
    jax.tree.leaves(generate_lib.restore_params(str(full))[0]),
    jax.tree.leaves(generate_lib.restore_params(str(resumed))[0]),
    strict=True,
  ):
    np.testing.assert_array_equal(a, b)
  # Generation reads the params back in the reference layout, whatever the table.
  params, step = generate_lib.restore_params(str(full))
  assert step == 4
  config = config_lib.from_config_dict(cd)
  reference = jax.eval_shape(lambda: model_lib.init_params(config))
  assert jax.tree.structure(params) == jax.tree.structure(reference)


def test_bench_smoke(tmp_path, monkeypatch):
  """bench/expert_placement.py end to end on 4 steps: the skewed router's busiest expert device
  share falls after the first re-placement, and the planner rows exist."""
  import sys

  sys.path.insert(0, 'bench')
  import expert_placement

  monkeypatch.setattr(sys, 'argv', ['expert_placement.py', '--smoke', '--out', str(tmp_path)])
  expert_placement.main()
  result = json.loads((tmp_path / 'expert_placement_smoke.json').read_text())
  first, second = result['windows']
  assert second['busiest_share'] < first['busiest_share']
  assert {p['workload'] for p in result['planner']} == {'train', 'decode'}


@pytest.mark.parametrize(
  'overrides, message',
  [
    ({'parallel.rebalance_every': -1}, 'parallel.rebalance_every=-1 must be an integer >= 0'),
    (
      {'parallel.rebalance_every': 10, 'parallel.strategy': 'dp'},
      "parallel.strategy='dp' has no expert slots to move",
    ),
  ],
)
def test_bad_input_errors(overrides, message):
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.from_config_dict(tiny_config(**{'parallel.strategy': 'ma_sep', **overrides}))
  assert message in str(err.value) and '\n' not in str(err.value)


def test_the_planner_predicts_the_rebalanced_step():
  """`ModelSpec(rebalanced=True)`: the busiest expert device of the LPT table, for ma_sep only
  (ep keeps its experts in place); the dropless seed step at 12:4 gets faster under skewed
  loads, and the planner's table is `rebalance.lpt_placement`'s."""
  from configs import paper
  from mas_jax import perf
  from mas_jax.perf import ep as ep_model
  from mas_jax.perf import ma_sep as ma_sep_model

  loads = (0.15, 0.16, 0.15, 0.13) + (0.41 / 12,) * 12
  np.testing.assert_array_equal(
    rebalance.lpt_placement(np.array(loads), 4), perf.model.lpt_placement(list(loads), 4)
  )
  m = perf.ModelSpec.from_config(config_lib.from_config_dict(paper.get_config()))
  m = dataclasses.replace(m, dropless=True, expert_loads=loads)
  placed = dataclasses.replace(m, rebalanced=True)
  assert m.imbalance(4) == pytest.approx(0.59 * 4) and placed.imbalance(4) < 1.1
  hw, w = perf.HARDWARE['h100'], perf.Workload('train', 1024, 2048, 32)
  split = ma_sep_model.Split(12, 4, 2)
  assert (
    ma_sep_model.predict(placed, hw, w, split).step_s < ma_sep_model.predict(m, hw, w, split).step_s
  )
  assert ep_model.predict(placed, hw, w, 16, 4).step_s == ep_model.predict(m, hw, w, 16, 4).step_s
