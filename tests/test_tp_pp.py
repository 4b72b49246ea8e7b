"""`tp_pp` equals the reference model in loss, metrics and gradients; bad shapes fail at once."""

import jax
import pytest
from strategy_harness import assert_matches_reference, small_config

from mas_jax import strategies
from mas_jax.config import ConfigError


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
  """tp=2 x pp=2 on 4 of the 16 devices, 2 layers (the dp test's model: a shared reference)."""
  config = tp_pp_config(2, 2, microbatches=2, dropless=True, **{'model.num_layers': 2})
  metrics = assert_matches_reference(config, devices=jax.devices()[:4])
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
  assert 'Memory per device (parameters + AdamW moments)' in text
