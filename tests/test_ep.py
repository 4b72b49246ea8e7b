"""`ep` equals the reference model in loss, metrics and gradients; bad shapes fail at once."""

import dataclasses
import functools

import jax
import pytest
from conftest import assert_trees_close
from strategy_harness import RTOL, run, small_config

from mas_jax import strategies
from mas_jax.config import ConfigError


@functools.lru_cache(maxsize=4)
def _reference(config):
  """The reference run of config's model and data (one compile per model shape)."""
  parallel = dataclasses.replace(config.parallel, strategy='reference', ep=16, tp=8, pp=2)
  return run(dataclasses.replace(config, parallel=parallel))


def assert_matches(config, devices=None):
  (loss, metrics), grads = run(config, devices)
  (ref_loss, ref_metrics), ref_grads = _reference(config)
  assert_trees_close(loss, ref_loss, RTOL)
  assert_trees_close(metrics, ref_metrics, RTOL, atol=1e-7)
  assert_trees_close(grads, ref_grads, RTOL)
  return metrics


def ep_config(ep, dropless=False, **overrides):
  return small_config(
    **{
      'parallel.strategy': 'ep',
      'parallel.ep': ep,
      'model.dropless': dropless,
      'model.capacity_factor': 0.5,
      **overrides,
    }
  )


@pytest.mark.timeout(120)
@pytest.mark.parametrize('ep', [16, 8])
def test_ep_matches_reference_with_dropped_tokens(ep):
  metrics = assert_matches(ep_config(ep))
  assert metrics['dropped_token_fraction'] > 0


@pytest.mark.timeout(120)
def test_ep_dropless_matches_reference():
  metrics = assert_matches(ep_config(8, dropless=True))
  assert metrics['dropped_token_fraction'] == 0


@pytest.mark.timeout(120)
def test_ep_on_four_devices():
  """EP=2 x DP=2 on a sub-set of the devices."""
  assert_matches(ep_config(2), devices=jax.devices()[:4])


@pytest.mark.parametrize(
  'overrides, message',
  [
    ({'parallel.ep': 3}, 'parallel.ep=3 does not divide the device count 16'),
    ({'parallel.ep': 32}, 'parallel.ep=32 does not divide the device count 16'),
    ({'parallel.ep': 8, 'model.num_experts': 12}, 'num_experts=12 is not divisible by .*ep=8'),
    ({'data.batch_size': 8}, 'data.batch_size=8 does not divide over devices'),
  ],
)
def test_ep_bad_shapes(overrides, message):
  with pytest.raises(ConfigError, match=message):
    strategies.get(ep_config(16, **overrides))


def test_ep_describe_reports_parameter_bytes():
  text = strategies.get(ep_config(16)).describe()
  assert 'parameter bytes per device' in text and len(text.splitlines()) >= 2
