"""Generation: prefill + decode equals the full forward pass, under every strategy; sampling."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_close
from strategy_harness import small_config

from configs import paper
from mas_jax import config as config_lib
from mas_jax import decode, strategies, train_lib
from mas_jax import model as model_lib
from mas_jax import perf as pm
from mas_jax.config import ConfigError
from mas_jax.perf import ma_sep as ma_sep_model

RTOL = 1e-5
CONTEXT = 16
LENGTHS = (5, 3, 4, 1, 5, 2, 3, 4, 2, 5, 1, 3, 4, 4, 5, 1)  # right-padded prompts, 16 rows
STEPS = 3  # decode steps after the prefill


def strategy_config(strategy='reference', **parallel):
  config = small_config(**{'model.dropless': True})
  config = dataclasses.replace(
    config, parallel=dataclasses.replace(config.parallel, strategy=strategy, **parallel)
  )
  return decode.decode_config(config, len(LENGTHS))


@functools.lru_cache(maxsize=1)
def inputs():
  """Parameters, token rows [16, 5 + STEPS] and the reference logits of the full sequences."""
  config = strategy_config()
  params = train_lib.init_params(config)
  rng = np.random.default_rng(3)
  tokens = rng.integers(0, config.model.vocab_size, (len(LENGTHS), max(LENGTHS) + STEPS))
  tokens = jnp.asarray(tokens, jnp.int32)
  full, _ = jax.jit(functools.partial(model_lib.forward, config.model))(params, tokens)
  return params, tokens, full


def expected_logits(full, step):
  """Reference logits at each row's own position of decode step `step` (prefill is step -1)."""
  lengths = np.asarray(LENGTHS)
  return full[np.arange(len(LENGTHS)), lengths + step]


def run_decode(strategy):
  """Prefill of each row's own prompt (right-padded) and STEPS decode steps at its positions."""
  params, tokens, _ = inputs()
  params = jax.jit(strategy.from_reference)(params)
  params = jax.device_put(params, strategy.param_shardings(params))
  forward = jax.jit(strategy.forward_cached, donate_argnums=1)
  lengths = jnp.asarray(LENGTHS, jnp.int32)
  prompt = jnp.where(
    jnp.arange(max(LENGTHS))[None, :] < lengths[:, None], tokens[:, : max(LENGTHS)], 0
  )
  params, cache = strategy.prepare_decode(params, CONTEXT)
  logits, cache = forward(params, cache, prompt, None)
  outputs = [logits]
  for step in range(STEPS):
    feed = tokens[jnp.arange(len(LENGTHS)), lengths + step][:, None]
    logits, cache = forward(params, cache, feed, lengths + step)
    outputs.append(logits[:, 0])
  return jax.device_get(outputs)


STRATEGIES = {
  'reference': ('reference', {}),
  'dp': ('dp', {}),
  # 8 heads on 12 devices: 12 slots, 4 of them padding; 4 expert devices, all_to_all dispatch.
  'ma_sep_12_4_m1': ('ma_sep', dict(attn_devices=12, moe_devices=4, num_microbatches=1)),
  'ma_sep_12_4_m2': ('ma_sep', dict(attn_devices=12, moe_devices=4, num_microbatches=2)),
  # Every expert device routes every token, a psum brings the parts back; hierarchical psums.
  'ma_sep_8_8_m2': (
    'ma_sep',
    dict(
      attn_devices=8,
      moe_devices=8,
      num_microbatches=2,
      moe_dispatch='replicated',
      hierarchical_allreduce=True,
    ),
  ),
}


@pytest.mark.timeout(240)
@pytest.mark.parametrize('name', sorted(STRATEGIES))
def test_prefill_and_decode_equal_the_forward_pass(name):
  strategy_name, parallel = STRATEGIES[name]
  strategy = strategies.get(strategy_config(strategy_name, **parallel))
  _, _, full = inputs()
  outputs = run_decode(strategy)
  for row, n in enumerate(LENGTHS):  # prefill: every position of each real prompt
    assert_trees_close(outputs[0][row, :n], full[row, :n], RTOL)
  for step in range(STEPS):
    assert_trees_close(outputs[step + 1], expected_logits(full, step), RTOL)


def test_ma_sep_decode_uses_the_expected_dispatch():
  _, parallel = STRATEGIES['ma_sep_12_4_m2']
  assert strategies.get(strategy_config('ma_sep', **parallel)).dispatch == 'all_to_all'
  _, parallel = STRATEGIES['ma_sep_8_8_m2']
  assert strategies.get(strategy_config('ma_sep', **parallel)).dispatch == 'replicated'


def test_cached_attention_sees_only_the_filled_cache():
  """Entries past cache_len (stale padding) change nothing; entries before it do."""
  from mas_jax.layers import attention as attn_lib

  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(kk, (2, 1, 2, 8)) for kk in (k1, k2, k3))
  cache = jax.random.normal(k1, (2, 6, 2, 8))
  length = jnp.asarray([3, 5])
  out = attn_lib.cached_attention(q, k, v, cache, cache, length)
  stale = cache.at[0, 3:].set(100.0).at[1, 5:].set(-100.0)
  np.testing.assert_array_equal(out, attn_lib.cached_attention(q, k, v, stale, stale, length))
  changed = cache.at[0, 2].add(1.0)
  assert not np.allclose(out[0], attn_lib.cached_attention(q, k, v, changed, changed, length)[0])


# ---------------------------------------------------------------------------------------------
# The generator: padding, greedy identity across strategies, EOS, errors.
# ---------------------------------------------------------------------------------------------

PROMPTS = [[11, 12, 13, 14, 15], [7], [300, 301, 302]]


@functools.lru_cache(maxsize=8)
def greedy(strategy_name, parallel_items):
  config = strategy_config(strategy_name, **dict(parallel_items))
  gen = decode.Generator(config, inputs()[0], context=CONTEXT)
  return gen.generate(PROMPTS, max_new_tokens=6)


@pytest.mark.timeout(240)
@pytest.mark.parametrize('name', ['ma_sep_12_4_m2'])  # dp: tests/test_generate.py
def test_greedy_generation_is_identical_across_strategies(name):
  strategy_name, parallel = STRATEGIES[name]
  result = greedy(strategy_name, tuple(parallel.items()))
  expected = greedy('reference', ())
  assert result.tokens == expected.tokens
  assert [len(t) for t in result.tokens] == [6, 6, 6]
  assert result.batch >= len(PROMPTS) and result.generated == 18  # padding never counted
  assert len(result.step_s) == 5 and result.tpot_s > 0 and result.tokens_per_s > 0


def test_greedy_generation_continues_the_reference_argmax():
  """Greedy tokens are the argmax of the full forward pass over prompt + generated tokens."""
  result = greedy('reference', ())
  params = inputs()[0]
  config = strategy_config()
  for prompt, new in zip(PROMPTS, result.tokens, strict=True):
    seq = jnp.asarray([prompt + new], jnp.int32)
    logits, _ = model_lib.forward(config.model, params, seq)
    argmax = np.asarray(jnp.argmax(logits[0, len(prompt) - 1 : -1], axis=-1))
    np.testing.assert_array_equal(argmax, new)


def test_generation_stops_at_eos():
  result = greedy('reference', ())
  eos = result.tokens[1][2]  # the third token greedy decoding gives prompt 1
  config = strategy_config()
  out = decode.Generator(config, inputs()[0], context=CONTEXT).generate(
    PROMPTS, max_new_tokens=6, eos_id=eos
  )
  assert out.tokens[1] == result.tokens[1][:2] and out.stopped_at_eos[1]
  for row in (0, 2):
    cut = result.tokens[row].index(eos) if eos in result.tokens[row] else 6
    assert out.tokens[row] == result.tokens[row][:cut]


@pytest.mark.parametrize(
  'prompts, kwargs, message',
  [
    ([[1] * 17], {}, 'prompt 0 has 17 tokens, longer than the cache context=16'),
    ([[1] * 12], {'max_new_tokens': 5}, '= 17 overflows the cache context=16'),
    ([[1]], {'temperature': -0.5}, 'temperature=-0.5 must be >= 0'),
    ([[1]], {'top_k': 5}, 'top_k=5 / top_p=1.0 need sampling'),
    ([[1]], {'top_p': 0.9}, 'top_k=0 / top_p=0.9 need sampling'),
    ([[1]], {'temperature': 1.0, 'top_p': 1.5}, 'top_p=1.5 must be in (0, 1]'),
    ([[1], []], {}, 'prompt 1 is empty'),
    ([], {}, 'no prompts given'),
    ([[1, 512]], {}, 'outside [0, model.vocab_size=512)'),
    ([[1]], {'max_new_tokens': 0}, 'max_new_tokens=0 must be >= 1'),
  ],
)
def test_bad_generation_input_fails_before_any_work(prompts, kwargs, message):
  gen = decode.Generator(strategy_config(), inputs()[0], context=CONTEXT)
  with pytest.raises(ConfigError) as e:
    gen.generate(prompts, **{'max_new_tokens': 4, **kwargs})
  assert message in str(e.value) and '\n' not in str(e.value)
  assert not gen._programs  # nothing was compiled


def test_bad_split_fails_when_the_generator_is_built():
  config = strategy_config('ma_sep', attn_devices=12, moe_devices=5)
  with pytest.raises(ConfigError, match='attn_devices=12 \\+ parallel.moe_devices=5 != device'):
    decode.Generator(config, inputs()[0], context=CONTEXT)


# ---------------------------------------------------------------------------------------------
# Sampling.
# ---------------------------------------------------------------------------------------------

LOGITS = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))


def frequencies(n=20000, **kwargs):
  keys = jax.random.split(jax.random.key(0), n)
  draw = jax.vmap(lambda k: decode.sample(LOGITS, k, **kwargs)[0])(keys)
  return np.bincount(np.asarray(draw), minlength=4) / n


def test_greedy_is_the_argmax():
  logits = jnp.asarray([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
  np.testing.assert_array_equal(decode.sample(logits, jax.random.key(0), 0.0), [1, 0])


def test_sampling_follows_softmax_of_logits_over_temperature():
  np.testing.assert_allclose(frequencies(temperature=1.0), [0.5, 0.3, 0.15, 0.05], atol=0.015)
  sharp = np.array([0.5, 0.3, 0.15, 0.05]) ** 2
  np.testing.assert_allclose(frequencies(temperature=0.5), sharp / sharp.sum(), atol=0.015)


def test_top_k_and_top_p_restrict_the_support():
  np.testing.assert_allclose(
    frequencies(temperature=1.0, top_k=2), [0.625, 0.375, 0, 0], atol=0.015
  )
  # Nucleus 0.7: 0.5 < 0.7, so the second token joins; 0.8 >= 0.7 so the third does not.
  np.testing.assert_allclose(
    frequencies(temperature=1.0, top_p=0.7), [0.625, 0.375, 0, 0], atol=0.015
  )
  np.testing.assert_allclose(
    frequencies(temperature=1.0, top_p=0.81), np.array([0.5, 0.3, 0.15, 0]) / 0.95, atol=0.015
  )
  np.testing.assert_array_equal(frequencies(n=200, temperature=1.0, top_p=0.1), [1, 0, 0, 0])


def test_ma_sep_arena_holds_experts_or_cache_not_both():
  """Per device: max(expert weights, KV cache) + scratch, from the shapes (8 heads, 12 slots)."""
  _, parallel = STRATEGIES['ma_sep_12_4_m1']
  strategy = strategies.get(strategy_config('ma_sep', **parallel))
  m = strategy.config.model
  expert = 2 * m.num_layers * (m.num_experts // 4) * m.d_model * m.expert_hidden * 4  # float32
  cache = 2 * m.num_layers * len(LENGTHS) * CONTEXT * 1 * m.head_dim * 4  # one slot per device
  scratch = CONTEXT * 1 * m.head_dim * 4
  rows = {r['device']: r for r in strategy.decode_memory_rows(CONTEXT)}
  assert expert > cache and all(r['arena_held'] == expert + scratch for r in rows.values())
  assert rows[0]['cache_used'] == 0  # device 0 holds no real head (8 heads on 12 devices)
  assert rows[1]['cache_used'] == cache and rows[1]['cache_held'] == 0
  assert rows[12]['role'] == 'expert' and rows[12]['cache_used'] == 0
  # Expert devices use their experts (in the arena) and part of what is held outside it.
  assert expert < rows[12]['weights_used'] < expert + rows[12]['weights_held']
  # A context long enough for the cache to outgrow the experts sizes the arena by the cache.
  long = strategy.arena_layout(4096)
  assert long['rows'] == 2 * long['kv_rows'] + 4096 and long['kv_rows'] > long['expert_rows']


@pytest.mark.parametrize('split', [(12, 4), (8, 8)])
@pytest.mark.parametrize('batch', [24, 256])
def test_planner_decode_memory_equals_the_strategy_accounting(split, batch):
  """The planner's ma_sep decode memory is the program's: the paper model in bf16 (shapes only).

  If the generation program changes its buffers, this fails until mas_jax.perf follows.
  """
  cd = paper.get_config()
  cd.model.compute_dtype = 'bfloat16'
  cd.parallel.attn_devices, cd.parallel.moe_devices = split
  strategy = strategies.get(decode.decode_config(config_lib.from_config_dict(cd), batch))
  rows = strategy.decode_memory_rows(2048)
  hw = pm.HARDWARE['h100']
  predicted = ma_sep_model.predict(
    pm.ModelSpec.from_config(cd), hw, pm.Workload('decode', batch, 2048), ma_sep_model.Split(*split)
  ).memory
  for r in rows:
    role = 'attention' if r['role'] == 'attention' else 'experts'
    assert predicted[role] == pytest.approx(r['held'], rel=1e-9), (r['device'], role)
