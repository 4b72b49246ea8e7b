"""ma_sep with parallel.attn_sharding='batch': data-parallel attention devices.

Every attention device holds all heads and runs its floor/ceil share of each micro-batch's
sequences; the outputs are all_gathered, and the attention weights' gradients all-reduced (and
top-k compressed under grad_compression='topk'). Loss, gradients and generation equal the
reference model's.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_decode
import test_perf_fidelity as fidelity
from conftest import assert_trees_close, tiny_config
from strategy_harness import _inputs, assert_matches_reference, small_config

from configs import paper
from mas_jax import config as config_lib
from mas_jax import decode, perf, strategies, zero
from mas_jax import model as model_lib
from mas_jax.mesh import RoleLayout
from mas_jax.perf import hlo
from mas_jax.perf import ma_sep as ma_sep_model

pytestmark = pytest.mark.timeout(300)

BATCH = {'parallel.strategy': 'ma_sep', 'parallel.attn_sharding': 'batch'}


@pytest.mark.parametrize(
  'overrides',
  [
    # 8 sequences per micro-batch on 12 attention devices: 4 of them hold only a padding slot;
    # all_to_all dispatch; two micro-batches co-execute.
    {'parallel.num_microbatches': 2},
    # 8:8, every expert device routes every token (psum of the experts' parts).
    {
      'parallel.attn_devices': 8,
      'parallel.moe_devices': 8,
      'parallel.moe_dispatch': 'replicated',
    },
  ],
  ids=['12_4_m2', '8_8_replicated'],
)
def test_matches_reference(overrides):
  assert_matches_reference(small_config(**BATCH, **overrides))


def test_prefill_and_decode_equal_the_forward_pass():
  """12:4, 2 micro-batches of 8 sequences: each attention device caches all heads of its own
  sequences (padding slots included) and the expert devices keep their experts in the arena."""
  parallel = dict(attn_devices=12, moe_devices=4, num_microbatches=2, attn_sharding='batch')
  strategy = strategies.get(test_decode.strategy_config('ma_sep', **parallel))
  _, _, full = test_decode.inputs()
  outputs = test_decode.run_decode(strategy)
  for row, n in enumerate(test_decode.LENGTHS):
    assert_trees_close(outputs[0][row, :n], full[row, :n], test_decode.RTOL)
  for step in range(test_decode.STEPS):
    assert_trees_close(outputs[step + 1], test_decode.expected_logits(full, step), test_decode.RTOL)
  rows = strategy.decode_memory_rows(test_decode.CONTEXT)
  # Device 0 has no sequence (8 on 12 devices); device 1 caches one per micro-batch.
  assert rows[0]['cache_used'] == 0
  m = strategy.config.model
  one = 2 * m.num_layers * test_decode.CONTEXT * m.num_heads * m.head_dim * 4
  assert rows[1]['cache_used'] == 2 * one


def test_compressed_attention_group():
  """With grad_compression='topk' the attention weights are replicated parameters: they get a
  residual, and sending every entry gives the uncompressed gradients."""
  fields = {**BATCH, 'data.seq_len': 16, 'parallel.attn_devices': 8, 'parallel.moe_devices': 8}
  config = config_lib.from_config_dict(tiny_config(**fields))
  compressed = config_lib.from_config_dict(
    tiny_config(**fields, **{'parallel.grad_compression': 'topk', 'parallel.topk_fraction': 1.0})
  )
  strategy = strategies.get(compressed)
  residual = zero.ParamLayout(compressed, strategy).residual_abstract()
  assert set(residual['blocks']['attn']) == {'wq', 'wk', 'wv', 'wo'}
  residual = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), residual)
  params, batch = _inputs(config)
  params = jax.jit(strategy.from_reference)(params)
  key = jax.random.key(7)
  plain = jax.jit(lambda p, b: strategies.get(config).value_and_grad(p, b, key))(params, batch)
  out, grads, new_residual = jax.jit(
    lambda p, b, r: strategy.value_and_grad_compressed(p, b, key, r)
  )(params, batch, residual)
  assert_trees_close((out, grads), plain, rtol=1e-6, atol=1e-7)
  assert all(float(jnp.abs(r).max()) == 0.0 for r in jax.tree.leaves(new_residual))


def test_sequences_follow_the_head_formula():
  """Attention device i runs sequences [i*b/A, (i+1)*b/A) of each micro-batch, padded to
  ceil(b/A) slots: 16 sequences over 12 devices -> 1 or 2 each, every sequence exactly once."""
  layout = RoleLayout(12, 4, 8, 16)
  table = layout.slot_sequences(16)
  assert table.shape == (16, 2)
  real = table[table >= 0]
  np.testing.assert_array_equal(np.sort(real), np.arange(16))
  assert [len(layout.sequences_of(d, 16)) for d in range(16)] == [1, 1, 2] * 4 + [0] * 4
  assert (table[12:] == -1).all()


def test_attention_weights_are_whole_on_every_device():
  strategy = strategies.get(small_config(**BATCH))
  params = jax.eval_shape(lambda: strategy.from_reference(_inputs(strategy.config)[0]))
  specs = strategy.param_specs(params)
  assert all(s == jax.sharding.PartitionSpec() for s in specs['blocks']['attn'].values())
  rows = strategy.memory_rows()
  assert rows[0]['state_used'] > 0 and rows[-1]['efficiency'] < 1


@pytest.mark.parametrize(
  'overrides, message',
  [
    ({'parallel.attn_sharding': 'rows'}, "parallel.attn_sharding='rows' is not one of"),
    (
      {'parallel.attn_sharding': 'batch', 'parallel.hierarchical_allreduce': True},
      'parallel.hierarchical_allreduce reduces head partial sums',
    ),
  ],
)
def test_bad_input_errors(overrides, message):
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.from_config_dict(tiny_config(**{'parallel.strategy': 'ma_sep', **overrides}))
  assert message in str(err.value) and '\n' not in str(err.value)


# ---------------------------------------------------------------------------------------------
# The planner follows the program: if the strategy changes its collectives or buffers, these
# fail until mas_jax/perf/ma_sep.py does too.
# ---------------------------------------------------------------------------------------------

FIDELITY_CASES = {
  '12:4 M=2 all_to_all': {'parallel.num_microbatches': 2},
  '8:8 replicated': {
    'parallel.attn_devices': 8,
    'parallel.moe_devices': 8,
    'parallel.moe_dispatch': 'replicated',
  },
}


@pytest.mark.parametrize('name', list(FIDELITY_CASES))
def test_planner_collectives_equal_the_compiled_train_step(name):
  """The attention all_gather and its reduce_scatter, no psum of attention outputs, and the
  attention weights in the replicated parameters' gradient psum."""
  config = fidelity._config({**BATCH, **FIDELITY_CASES[name]})
  compiled = fidelity._by_kind(fidelity._compiled_collectives(config))
  predicted = fidelity._by_kind(perf.predict_config(config, perf.HARDWARE['h100'], 16).collectives)
  assert set(predicted) == set(compiled), (predicted, compiled)
  for key, nbytes in compiled.items():
    assert predicted[key] == pytest.approx(nbytes, rel=0.01), (key, predicted, compiled)


def test_planner_collectives_equal_the_compiled_decode_step():
  config = fidelity._config({**BATCH, 'model.dropless': True})
  batch, context = config.data.batch_size, 32
  generator = decode.Generator(config, model_lib.init_params(config), context)
  step = generator._compiled(generator.padded_batch(batch), 4, (0.0, 0, 1.0))['step']
  compiled = fidelity._by_kind(hlo.collectives(step.as_text()))
  workload = perf.Workload('decode', batch, context)
  prediction = perf.predict_config(config, perf.HARDWARE['h100'], 16, workload=workload)
  predicted = fidelity._by_kind(prediction.collectives)
  assert set(predicted) == set(compiled), (predicted, compiled)
  for key, nbytes in compiled.items():
    assert predicted[key] == pytest.approx(nbytes, rel=0.01), (key, predicted, compiled)


def test_planner_state_bytes_equal_the_strategy():
  """Every device holds the attention weights whole; the attention devices use all of them."""
  config = fidelity._config(BATCH)
  strategy = strategies.get(config)
  rows = strategy.memory_rows()
  prediction = perf.predict_config(config, perf.HARDWARE['h100'], 16)
  for role, key in (('attention', 'attention'), ('experts', 'expert')):
    assert prediction.memory_by_role[role].state == pytest.approx(rows[0]['state_held'], rel=0.01)
    used = max(r['state_used'] for r in rows if r['role'] == key)
    assert prediction.memory_by_role[role].used == pytest.approx(used, rel=0.01), role


@pytest.mark.parametrize('split', [(12, 4), (8, 8)])
@pytest.mark.parametrize('batch', [24, 256])
def test_planner_decode_memory_equals_the_strategy_accounting(split, batch):
  """The paper model in bf16 with its 4 micro-batches (shapes only): each attention device's
  cache holds M x ceil(b / A) sequences of all 32 heads."""
  cd = paper.get_config()
  cd.model.compute_dtype = 'bfloat16'
  cd.parallel.attn_devices, cd.parallel.moe_devices = split
  cd.parallel.attn_sharding = 'batch'
  strategy = strategies.get(decode.decode_config(config_lib.from_config_dict(cd), batch))
  rows = strategy.decode_memory_rows(2048)
  s = ma_sep_model.Split(*split, cd.parallel.num_microbatches, attn_sharding='batch')
  workload = perf.Workload('decode', batch, 2048)
  predicted = ma_sep_model.predict(
    perf.ModelSpec.from_config(cd), perf.HARDWARE['h100'], workload, s
  ).memory
  for r in rows:
    role = 'attention' if r['role'] == 'attention' else 'experts'
    assert predicted[role] == pytest.approx(r['held'], rel=1e-9), (r['device'], role)


def test_bench_smoke(tmp_path, monkeypatch):
  """bench/attn_sharding.py end to end at tiny shapes: timings of both options, the planner's
  rows and picks for the seed model (train, decode)."""
  sys.path.insert(0, 'bench')
  import attn_sharding

  monkeypatch.setattr(sys, 'argv', ['attn_sharding.py', '--smoke', '--out', str(tmp_path)])
  attn_sharding.main()
  result = json.loads((tmp_path / 'attn_sharding_smoke.json').read_text())
  assert {k['option'] for k in result['kernels']} == {'heads', 'batch'}
  assert all('fwd_s' in k or 'time_s' in k for k in result['kernels'])
  for choice in result['planner'].values():
    assert {r['option'] for r in choice['seed_split']} == {'heads', 'batch'}
    assert choice['pick_overall'] in ('heads', 'batch')
