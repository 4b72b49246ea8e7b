"""`dp` equals the reference model in loss, metrics and gradients."""

import pytest
from strategy_harness import assert_matches_reference, small_config


@pytest.mark.timeout(120)
@pytest.mark.parametrize('dropless', [False, True])
def test_dp_matches_reference(dropless):
  config = small_config(
    **{'parallel.strategy': 'dp', 'model.dropless': dropless, 'model.capacity_factor': 0.5}
  )
  metrics = assert_matches_reference(config)
  # The tight capacity factor really drops tokens (and dropless drops none).
  assert (metrics['dropped_token_fraction'] == 0) == dropless
