"""The planner models the program that runs: collectives, parameter bytes and temporaries.

Each case compiles a strategy's train step (or one decode step) for the tiny model on 16 fake CPU
devices and reads the collectives from the compiled HLO (mas_jax.perf.hlo); the strategy's cost
model must list the same ones: per (kind, group size), the bytes per device of one step within 1%.
Collectives under 1% of a program's bytes (scalar loss and statistic sums) and one-device groups
are left out of both sides. The parameter and optimizer bytes per device must equal the strategy's
own accounting within 1%, and the gradients + activations the compiled temporaries within the
bounds given at MEMORY_CASES.

When a strategy changes its collectives or buffers, these fail until mas_jax/perf follows.
The tiny model computes in float32: the CPU compiler runs bfloat16 collectives in float32, so a
bfloat16 compile would not show the bytes a GPU moves.
"""

import collections
import functools

import jax
import pytest
from conftest import tiny_config

from mas_jax import config as config_lib
from mas_jax import decode, perf, strategies, train_lib
from mas_jax import model as model_lib
from mas_jax.perf import hlo
from mas_jax.perf import ma_sep as ma_sep_model
from mas_jax.strategies import base

# Train steps of the tiny model without remat (tp_pp, ep, dp and ma_sep 12:4 with all_to_all
# dispatch are compiled with remat='full' at MEMORY_CASES, where the collectives are checked too).
CASES = {
  'ma_sep 12:4 replicated M=2': {
    'parallel.strategy': 'ma_sep',
    'parallel.moe_dispatch': 'replicated',
    'parallel.num_microbatches': 2,
  },
  'ma_sep 12:4 hierarchical': {
    'parallel.strategy': 'ma_sep',
    'parallel.hierarchical_allreduce': True,
  },
  'ma_sep 8:8 M=2 accum 2': {
    'parallel.strategy': 'ma_sep',
    'parallel.attn_devices': 8,
    'parallel.moe_devices': 8,
    'parallel.num_microbatches': 2,
    'data.batch_size': 32,
    'train.grad_accum_steps': 2,
  },
  'ep 16, accum 2': {
    'parallel.strategy': 'ep',
    'parallel.ep': 16,
    'data.batch_size': 32,
    'train.grad_accum_steps': 2,
  },
  # The compute copy's all-gathers (shared weights over 16, experts over the data pairs).
  'ep 8x2, accum 2, shard_optimizer': {
    'parallel.strategy': 'ep',
    'parallel.ep': 8,
    'data.batch_size': 32,
    'train.grad_accum_steps': 2,
    'parallel.shard_optimizer': True,
  },
  'tp_pp 8x2 1f1b M=4': {
    'parallel.strategy': 'tp_pp',
    'parallel.num_microbatches': 4,
    'parallel.pp_schedule': '1f1b',
  },
}


def _config(overrides):
  return config_lib.from_config_dict(tiny_config(**overrides))


def _compile(config):
  """The strategy's train step for `config`, compiled (never run) on 16 fake CPU devices."""
  return train_lib.compile_abstract_train_step(config, strategies.get(config))


def _compiled_collectives(config):
  return hlo.collectives(_compile(config).as_text())


def _by_kind(items) -> dict[tuple[str, int], float]:
  totals = collections.Counter()
  for c in items:
    if c.group > 1 or c.kind == 'collective-permute':  # a permute's group is its pairs
      totals[(c.kind, c.group)] += c.bytes
  floor = 0.01 * sum(totals.values())
  return {k: v for k, v in totals.items() if v >= floor}


@pytest.mark.timeout(300)
@pytest.mark.parametrize('name', list(CASES))
def test_planner_collectives_equal_the_compiled_program(name):
  config = _config(CASES[name])
  compiled = _by_kind(_compiled_collectives(config))
  predicted = _by_kind(perf.predict_config(config, perf.HARDWARE['h100'], 16).collectives)
  assert set(predicted) == set(compiled), (predicted, compiled)
  for key, nbytes in compiled.items():
    assert predicted[key] == pytest.approx(nbytes, rel=0.01), (key, predicted, compiled)


# One decode step per strategy with collectives (dp's has none; ma_sep's replicated dispatch runs
# the training's tick exchange, checked above).
DECODE_CASES = {
  'ma_sep 12:4 all_to_all': {'parallel.strategy': 'ma_sep'},
  'tp_pp 8x2 M=2': {'parallel.strategy': 'tp_pp', 'parallel.num_microbatches': 2},
  'ep 4x4': {'parallel.strategy': 'ep', 'parallel.ep': 4},
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize('name', list(DECODE_CASES))
def test_planner_decode_collectives_equal_the_compiled_step(name):
  """One decode step (one new token for each of 16 sequences, a 32-position cache)."""
  config = _config({**DECODE_CASES[name], 'model.dropless': True})
  batch, context = config.data.batch_size, 32
  generator = decode.Generator(config, model_lib.init_params(config), context)
  step = generator._compiled(generator.padded_batch(batch), 4, (0.0, 0, 1.0))['step']
  compiled = _by_kind(hlo.collectives(step.as_text()))
  workload = perf.Workload('decode', batch, context)
  prediction = perf.predict_config(config, perf.HARDWARE['h100'], 16, workload=workload)
  predicted = _by_kind(prediction.collectives)
  assert set(predicted) == set(compiled), (predicted, compiled)
  for key, nbytes in compiled.items():
    assert predicted[key] == pytest.approx(nbytes, rel=0.01), (key, predicted, compiled)


@pytest.mark.parametrize(
  'name',
  [
    'ma_sep 12:4 M=4',
    'ma_sep 8:8 M=2',
    'tp_pp 2x8 M=4 (known miss)',
    'ep 4x4',
    'dp 16',
  ],
)
def test_planner_parameter_and_optimizer_bytes_equal_the_strategy(name):
  """Per device: fp32 parameters + two AdamW moments as the strategy shards them (dummy slots
  included), against the planner's `Memory.state` of every role."""
  config = _config({**MEMORY_BASE, **MEMORY_CASES[name][0]})
  strategy = strategies.get(config)
  abstract = jax.eval_shape(lambda: strategy.from_reference(train_lib.init_params(config)))
  specs = strategy.param_specs(abstract)
  held = sum(
    base.local_bytes(strategy.mesh, spec, leaf.shape, 4)
    for spec, leaf in zip(
      jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
      jax.tree.leaves(abstract),
      strict=True,
    )
  )
  prediction = perf.predict_config(config, perf.HARDWARE['h100'], 16)
  for role, memory in prediction.memory_by_role.items():
    assert memory.state == pytest.approx(3 * held, rel=0.01), role
  if config.parallel.strategy == 'ma_sep':
    rows = strategy.memory_rows()
    for role, key in (('attention', 'attention'), ('experts', 'expert')):
      used = max(r['state_used'] for r in rows if r['role'] == key)
      assert prediction.memory_by_role[role].used == pytest.approx(used, rel=0.01), role


@pytest.mark.parametrize('layers,micro', [(1, 1), (2, 1), (2, 3), (4, 2), (3, 4)])
def test_planner_schedule_is_the_strategys(layers, micro):
  from mas_jax.strategies import ma_separation

  code = [(t.attn, t.moe) for t in ma_separation.schedule(layers, micro)]
  assert [(t.attn, t.moe) for t in ma_sep_model.schedule(layers, micro)] == code


# Train steps with remat='full' (the setting for models that need memory), XLA attention (the CPU
# compile holds the float32 scores, and the planner counts them with attention_impl='xla'): the
# planner's gradients + activations against the compiled temporaries. Measured ratios when this
# test was written: dp 1.00, ep16 1.00, ep4 0.94, tp_pp 8x2 1.13. tp_pp 8x2 M=4 with
# pp_schedule='1f1b': 1.07 (71.0 MB compiled, GPipe's 113.2 MB). ma_sep since its ticks keep only
# their inputs (`_switch_into_sinks`): 12:4 M=4 1.06, M=1 1.24, 8:8 M=2 1.14 (0.88, 1.24 and 1.37
# before); since a tick's switch returns the attention and MoE outputs as two arrays instead of
# one [2, b, T, D] (attn_sharding='batch'), the all_to_all steps shrank: 12:4 M=4 1.12 (146.9 ->
# 138.1 MB compiled), M=1 1.31 (206.9 -> 195.4 MB); 8:8 M=2 (replicated dispatch) 1.14. Known
# misses, held to a looser bound so that they cannot drift unnoticed: tp_pp 2x8 (1.40), ma_sep
# 12:4 M=1 (1.31). remat='none' is not modelled well (dp: 0.48) and not tested.
MEMORY_BASE = {
  'model.d_model': 256,
  'model.num_heads': 8,
  'model.expert_hidden': 512,
  'model.num_layers': 4,
  'data.seq_len': 128,
  'data.batch_size': 64,
  'model.expert_dropout': 0.0,
  'model.remat': 'full',
  'model.attention_impl': 'xla',
}
MEMORY_CASES = {
  'dp 16': ({'parallel.strategy': 'dp'}, 0.25),
  'ep16': ({'parallel.strategy': 'ep', 'parallel.ep': 16}, 0.25),
  'ep 4x4': ({'parallel.strategy': 'ep', 'parallel.ep': 4}, 0.25),
  'tp_pp 8x2 M=4': ({'parallel.strategy': 'tp_pp', 'parallel.num_microbatches': 4}, 0.25),
  'tp_pp 8x2 1f1b M=4': (
    {'parallel.strategy': 'tp_pp', 'parallel.num_microbatches': 4, 'parallel.pp_schedule': '1f1b'},
    0.25,
  ),
  'ma_sep 12:4 M=4': ({'parallel.strategy': 'ma_sep', 'parallel.num_microbatches': 4}, 0.25),
  'ma_sep 12:4 M=1 (known miss)': ({'parallel.strategy': 'ma_sep'}, 0.35),
  'tp_pp 2x8 M=4 (known miss)': (
    {
      'parallel.strategy': 'tp_pp',
      'parallel.tp': 2,
      'parallel.pp': 8,
      'model.num_layers': 8,
      'parallel.num_microbatches': 4,
    },
    0.45,
  ),
  'ma_sep 8:8 M=2': (
    {
      'parallel.strategy': 'ma_sep',
      'parallel.attn_devices': 8,
      'parallel.moe_devices': 8,
      'parallel.num_microbatches': 2,
    },
    0.25,
  ),
}


@functools.cache
def _memory_case(name):
  """(config, compiled collectives, compiled temporaries) of a MEMORY_CASES step, compiled once."""
  config = _config({**MEMORY_BASE, **MEMORY_CASES[name][0]})
  compiled = _compile(config)
  return config, hlo.collectives(compiled.as_text()), compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.timeout(300)
@pytest.mark.parametrize('name', list(MEMORY_CASES))
def test_planner_collectives_of_remat_steps(name):
  """Under remat='full' the recomputed forward repeats the collectives inside the blocks."""
  config, collectives, _ = _memory_case(name)
  compiled = _by_kind(collectives)
  predicted = _by_kind(perf.predict_config(config, perf.HARDWARE['h100'], 16).collectives)
  assert set(predicted) == set(compiled), (predicted, compiled)
  for key, nbytes in compiled.items():
    assert predicted[key] == pytest.approx(nbytes, rel=0.01), (key, predicted, compiled)


@pytest.mark.timeout(300)
@pytest.mark.parametrize('name', list(MEMORY_CASES))
def test_planner_temporaries_near_the_compiled_step(name):
  config, _, temp = _memory_case(name)
  tolerance = MEMORY_CASES[name][1]
  prediction = perf.predict_config(config, perf.HARDWARE['h100'], 16)
  for role, memory in prediction.memory_by_role.items():
    assert memory.grads + memory.activations == pytest.approx(temp, rel=tolerance), role
