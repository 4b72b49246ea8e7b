"""`tp_pp` equals the reference model in loss, metrics and gradients; bad shapes fail at once."""

import dataclasses
import functools

import jax
import numpy as np
import pytest
from conftest import assert_trees_close
from strategy_harness import RTOL, small_config

from mas_jax import strategies, train_lib
from mas_jax.config import ConfigError


def _reference_config(config):
  return dataclasses.replace(
    config, parallel=dataclasses.replace(config.parallel, strategy='reference')
  )


@functools.lru_cache(maxsize=4)
def _inputs(config):
  """Parameters and batch of config's model and data (shared by every strategy run)."""
  params = jax.jit(functools.partial(train_lib.init_params, config))()
  batch = np.random.default_rng(0).integers(
    0, config.model.vocab_size, (config.data.batch_size, config.data.seq_len + 1), dtype=np.int32
  )
  return jax.device_get(params), batch


def run(config, devices=None):
  """((loss, metrics), grads) of config's strategy with expert dropout on, jitted."""
  strategy = strategies.get(config, devices)
  params, batch = _inputs(_reference_config(config))
  params = jax.device_put(params, strategy.param_shardings(params))
  batch = jax.device_put(batch, strategy.batch_sharding())
  key = jax.random.key(7)
  return jax.device_get(jax.jit(lambda p, b: strategy.value_and_grad(p, b, key))(params, batch))


@functools.lru_cache(maxsize=4)
def _reference(config):
  return run(config)


def assert_matches_reference(config, devices=None):
  (loss, metrics), grads = run(config, devices)
  (ref_loss, ref_metrics), ref_grads = _reference(_reference_config(config))
  assert_trees_close(loss, ref_loss, RTOL)
  assert_trees_close(metrics, ref_metrics, RTOL, atol=1e-7)
  assert_trees_close(grads, ref_grads, RTOL)
  return metrics


def tp_pp_config(tp, pp, microbatches=4, dropless=False, **overrides):
  """8 layers (so that every pp up to 8 divides them), a tight capacity factor."""
  return small_config(
    **{
      'parallel.strategy': 'tp_pp',
      'parallel.tp': tp,
      'parallel.pp': pp,
      'parallel.num_microbatches': microbatches,
      'model.num_layers': 8,
      'model.dropless': dropless,
      'model.capacity_factor': 0.5,
      **overrides,
    }
  )


@pytest.mark.timeout(180)
@pytest.mark.parametrize('tp, pp', [(8, 2), (4, 4), (2, 8)])
def test_tp_pp_matches_reference_with_dropped_tokens(tp, pp):
  metrics = assert_matches_reference(tp_pp_config(tp, pp))
  assert metrics['dropped_token_fraction'] > 0


@pytest.mark.timeout(180)
def test_tp_pp_on_four_devices_dropless():
  metrics = assert_matches_reference(
    tp_pp_config(2, 2, microbatches=2, dropless=True), devices=jax.devices()[:4]
  )
  assert metrics['dropped_token_fraction'] == 0


@pytest.mark.parametrize(
  'tp, pp, overrides, message',
  [
    (4, 2, {}, r'parallel.tp=4 x parallel.pp=2 = 8 != device count 16'),
    (16, 1, {}, 'model.num_heads=8 is not divisible by parallel.tp=16'),
    (8, 2, {'model.expert_hidden': 100}, 'model.expert_hidden=100 is not divisible by .*tp=8'),
    (2, 8, {'model.num_layers': 6}, 'model.num_layers=6 is not divisible by parallel.pp=8'),
    (8, 2, {'parallel.num_microbatches': 3}, 'num_microbatches=3 does not divide .*batch_size=16'),
  ],
)
def test_tp_pp_bad_shapes(tp, pp, overrides, message):
  with pytest.raises(ConfigError, match=message):
    strategies.get(tp_pp_config(tp, pp, **overrides))


def test_tp_pp_describe_reports_bubble_and_parameter_bytes():
  strategy = strategies.get(tp_pp_config(8, 2, microbatches=4))
  assert strategy.bubble_fraction == pytest.approx(1 / 5)
  text = strategy.describe()
  assert 'bubble fraction (pp-1)/(M+pp-1) = 0.200' in text
  assert 'parameter bytes per device' in text
