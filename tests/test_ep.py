"""`ep` equals the reference model in loss, metrics and gradients; bad shapes fail at once."""

import pytest
from strategy_harness import assert_matches_reference, small_config

from mas_jax import strategies
from mas_jax.config import ConfigError


def ep_config(ep, dropless=False, **overrides):
  """The dp test's model (a shared reference) with a tight capacity factor."""
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
  metrics = assert_matches_reference(ep_config(ep))
  assert metrics['dropped_token_fraction'] > 0


@pytest.mark.timeout(120)
def test_ep_dropless_matches_reference():
  metrics = assert_matches_reference(ep_config(8, dropless=True))
  assert metrics['dropped_token_fraction'] == 0


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
  assert 'Memory per device (parameters + AdamW moments)' in text and len(text.splitlines()) >= 2
