"""Generation under `tp_pp` and `ep` equals the reference model: logits and greedy tokens.

Each strategy prefills right-padded prompts of different lengths (the padding holds other tokens,
which the decode steps must overwrite), then decodes N teacher-forced steps, every row at its own
position. Every logit must equal the full `model.forward` (dropless) over the same tokens at that
position. One jitted program per strategy for the prefill and one for all steps.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_close
from strategy_harness import RTOL, small_config

from mas_jax import config as config_lib
from mas_jax import decode, strategies, train_lib
from mas_jax import model as model_lib
from mas_jax.config import ConfigError
from mas_jax.strategies import tp_pp

BATCH, PROMPT, STEPS = 16, 8, 3

CASES = {
  'tp_pp-8x2-M1': {'parallel.strategy': 'tp_pp', 'parallel.tp': 8, 'parallel.pp': 2},
  'tp_pp-8x2-M2': {
    'parallel.strategy': 'tp_pp',
    'parallel.tp': 8,
    'parallel.pp': 2,
    'parallel.num_microbatches': 2,
  },
  'tp_pp-4x4-M2': {
    'parallel.strategy': 'tp_pp',
    'parallel.tp': 4,
    'parallel.pp': 4,
    'parallel.num_microbatches': 2,
    'model.num_layers': 4,
  },
  'ep-16': {'parallel.strategy': 'ep', 'parallel.ep': 16},
  'ep-8x2': {'parallel.strategy': 'ep', 'parallel.ep': 8},
}


def case_config(name: str):
  """The strategy's decode config (dropless, batch BATCH); tp_pp defaults to M=1."""
  overrides = {'parallel.num_microbatches': 1, **CASES[name]}
  return decode.decode_config(small_config(**overrides), BATCH)


def as_reference(config):
  """The same model and batch on the reference strategy (a shared cache key for its results)."""
  return dataclasses.replace(
    config, parallel=config_lib.ParallelConfig('reference', 1, 1, 1, False, 1, 1, 1)
  )


@functools.lru_cache(maxsize=2)
def reference_run(config) -> dict:
  """Params, sequences, prompt lengths, padded prompts and the full forward's logits."""
  params = train_lib.init_params(config)
  rng = np.random.default_rng(0)
  vocab = config.model.vocab_size
  seqs = rng.integers(0, vocab, (BATCH, PROMPT + STEPS), dtype=np.int32)
  lengths = (PROMPT - np.arange(BATCH) % 3).astype(np.int32)  # rows of 8, 7 and 6 tokens
  prompts = seqs[:, :PROMPT].copy()
  padding = np.arange(PROMPT)[None, :] >= lengths[:, None]
  prompts[padding] = rng.integers(0, vocab, padding.sum())
  forward = jax.jit(lambda p, t: model_lib.forward(config.model, p, t)[0])
  logits = np.asarray(forward(params, seqs))  # [B, P + N, V]
  return {'params': params, 'seqs': seqs, 'lengths': lengths, 'prompts': prompts, 'logits': logits}


@pytest.mark.timeout(120)
@pytest.mark.parametrize('name', CASES)
def test_prefill_and_decode_steps_match_full_forward(name):
  config = case_config(name)
  ref = reference_run(as_reference(config))
  strategy = strategies.get(config)
  params = jax.jit(strategy.from_reference)(ref['params'])
  params = jax.device_put(params, strategy.param_shardings(params))
  forward = jax.jit(strategy.forward_cached, donate_argnums=1)
  rows, lengths = np.arange(BATCH), ref['lengths']

  cache = strategy.init_cache(PROMPT + STEPS)
  logits, cache = forward(params, cache, ref['prompts'], None)
  assert logits.sharding.is_fully_replicated or name.startswith('ep')
  in_prompt = np.arange(PROMPT)[None, :] < lengths[:, None]  # [B, P]; the rest is padding
  expected = ref['logits'][:, :PROMPT][in_prompt]
  assert_trees_close(np.asarray(logits)[in_prompt], expected, RTOL)

  for i in range(STEPS):
    positions = jnp.asarray(lengths + i)  # [B]: every row at its own position
    tokens = ref['seqs'][rows, lengths + i][:, None]  # [B, 1]
    logits, cache = forward(params, cache, tokens, positions)
    expected = ref['logits'][rows, lengths + i]  # [B, V]
    assert_trees_close(np.asarray(logits)[:, 0], expected, RTOL)


@functools.lru_cache(maxsize=2)
def reference_tokens(config, prompts: tuple) -> list:
  generator = decode.Generator(config, reference_run(config)['params'], context=16)
  return generator.generate([list(p) for p in prompts], max_new_tokens=6).tokens


@pytest.mark.timeout(120)
@pytest.mark.parametrize('name', ['tp_pp-8x2-M2', 'ep-8x2'])
def test_generator_greedy_tokens_match_reference(name):
  """Prompts of 5, 3, 1, 4 and 2 tokens, the batch padded to the strategy's multiple."""
  config = case_config(name)
  prompts = ((5, 17, 9, 300, 2), (3, 44, 8), (7,), (100, 200, 300, 400), (11, 12))
  params = reference_run(as_reference(config))['params']
  result = decode.Generator(config, params, context=16).generate([list(p) for p in prompts], 6)
  assert result.batch == (6 if name.startswith('tp_pp') else 16)
  assert result.tokens == reference_tokens(as_reference(config), prompts)


@pytest.mark.parametrize(
  'name, message',
  [
    ('tp_pp-8x2-M2', r'decode batch 7 does not divide into parallel.num_microbatches=2'),
    ('ep-8x2', r'decode batch 7 does not divide over devices \(data x expert\)=16'),
  ],
)
def test_forward_cached_rejects_an_indivisible_batch(name, message):
  strategy = strategies.get(case_config(name))
  tokens = jnp.zeros((7, 1), jnp.int32)
  with pytest.raises(ConfigError, match=message):
    strategy.forward_cached({}, {}, tokens, jnp.zeros((7,), jnp.int32))


@pytest.mark.parametrize(
  'name, message',
  [
    ('tp_pp-8x2-M2', r'data.batch_size=7 does not divide over parallel.num_microbatches=2'),
    ('ep-8x2', r'data.batch_size=7 does not divide over devices \(data x expert\)=16'),
  ],
)
def test_decode_strategy_rejects_an_indivisible_batch(name, message):
  with pytest.raises(ConfigError, match=message):
    strategies.get(decode.decode_config(case_config(name), 7))


def test_write_rows_skips_invalid_ticks():
  """A stage outside its micro-batches must leave the cache as it is."""
  cache = jnp.zeros((2, 4, 5, 1, 1))  # [L, B, S, N, H]
  new = jnp.ones((2, 2, 1, 1))  # rows 2..3, two tokens each
  start = jnp.array([1, 3])
  written = tp_pp._write_rows(cache, 1, 2, new, start, jnp.bool_(True))
  expected = np.zeros((2, 4, 5, 1, 1))
  expected[1, 2, 1:3] = expected[1, 3, 3:5] = 1
  np.testing.assert_array_equal(written, expected)
  np.testing.assert_array_equal(tp_pp._write_rows(cache, 1, 2, new, start, jnp.bool_(False)), 0)
