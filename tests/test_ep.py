"""`ep` equals the reference model in loss, metrics and gradients; bad shapes fail at once."""

import pytest
from strategy_harness import assert_matches_reference, small_config

from mas_jax import strategies
from mas_jax.config import ConfigError
from mas_jax.strategies import ep as ep_lib


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


@pytest.mark.parametrize('ep', [16, 4])
def test_ep_describe_reports_parameter_bytes(ep):
  """The reported bytes equal a count from the config's shapes: everything replicated but the
  experts, of which a device holds E / ep; float32 parameters, AdamW adds two moments."""
  config = ep_config(ep)
  m = config.model
  d, nh, f, e = m.d_model, m.num_heads * m.head_dim, m.expert_hidden, m.num_experts
  per_layer = 2 * d + 4 * d * nh + d * e + (e // ep) * 2 * d * f  # norms, attention, router, FFNs
  param_bytes = 4 * (2 * m.vocab_size * d + d + m.num_layers * per_layer)  # + embed, head, norm
  strategy = strategies.get(config)
  params = ep_lib.abstract_params(m)
  specs = strategy.param_specs(params)
  assert ep_lib.param_bytes_per_device(strategy.mesh, specs, params) == param_bytes
  text = strategy.describe()
  assert f'{3 * param_bytes / 1e6:.4g} MB held' in text, text
  assert f'(parameters {param_bytes / 1e6:.4g} MB;' in text, text
