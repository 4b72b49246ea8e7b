"""`tp_pp` equals the reference model in loss, metrics and gradients; bad shapes fail at once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from strategy_harness import assert_matches_reference, small_config

from mas_jax import strategies, train_lib
from mas_jax.config import ConfigError
from mas_jax.strategies import tp_pp


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


# -------------------------------------------------------------------------------------------
# parallel.pp_schedule='1f1b'
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize('pp, microbatches', [(1, 3), (2, 2), (2, 8), (4, 4), (4, 8), (8, 4)])
def test_one_f_one_b_table(pp, microbatches):
  """Every stage runs each micro-batch's forward, then its backward, once; 2 (M + pp - 1) ticks
  (the table itself asserts at most pp stage inputs and one cotangent held per stage)."""
  table = tp_pp.one_f_one_b(pp, microbatches)
  assert table.shape == (2 * (microbatches + pp - 1), pp, 4)
  for s in range(pp):
    ops = [(op, m) for op, m in table[:, s, :2].tolist() if op != tp_pp.IDLE]
    fwd = [m for op, m in ops if op == tp_pp.FORWARD]
    bwd = [m for op, m in ops if op == tp_pp.BACKWARD]
    assert fwd == bwd == list(range(microbatches))
    for m in range(microbatches):
      assert ops.index((tp_pp.FORWARD, m)) < ops.index((tp_pp.BACKWARD, m))
  # What a stage receives is what its neighbour ran in that tick.
  op, m = table[..., 0], table[..., 1]
  np.testing.assert_array_equal(
    table[:, 1:, 2], np.where(op[:, :-1] == tp_pp.FORWARD, m[:, :-1], -1)
  )
  np.testing.assert_array_equal(
    table[:, :-1, 3], np.where(op[:, 1:] == tp_pp.BACKWARD, m[:, 1:], -1)
  )


@pytest.mark.timeout(180)
# M = pp at pp = 2 and M > pp at pp = 4 (warm-up, steady 1F1B and cool-down ticks all occur;
# test_one_f_one_b_table checks the table of more shapes).
@pytest.mark.parametrize('tp, pp, microbatches', [(8, 2, 2), (4, 4, 8)])
def test_tp_pp_1f1b_matches_reference(tp, pp, microbatches):
  """Loss, metrics and gradients of the hand-written 1F1B backward equal the reference's, with
  expert dropout (the keys per layer and micro-batch are the GPipe path's) and dropped tokens."""
  config = tp_pp_config(tp, pp, microbatches, **{'parallel.pp_schedule': '1f1b'})
  assert config.model.expert_dropout > 0
  metrics = assert_matches_reference(config)
  assert metrics['dropped_token_fraction'] > 0


def test_tp_pp_bad_schedule():
  with pytest.raises(ConfigError, match=r"parallel.pp_schedule='pipedream' is not one of"):
    tp_pp_config(8, 2, **{'parallel.pp_schedule': 'pipedream'})


def _value_and_grad_temp_bytes(config) -> int:
  """Temporaries per device of the compiled value_and_grad (abstract inputs, nothing runs)."""
  strategy = strategies.get(config)
  params = jax.eval_shape(lambda: strategy.from_reference(train_lib.init_params(config)))
  params = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    params,
    strategy.param_shardings(params),
  )
  shape = (config.data.batch_size, config.data.seq_len + 1)
  batch = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=strategy.batch_sharding())
  step = jax.jit(lambda p, b: strategy.value_and_grad(p, b, jax.random.key(0)))
  return step.lower(params, batch).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.timeout(240)
def test_tp_pp_1f1b_activation_memory_is_flat_in_microbatches():
  """tp 8 x pp 2, 2 layers, micro-batches of 4 sequences of 64 tokens: GPipe's temporaries grow
  with M (every stage keeps all M micro-batches' activations), 1F1B's do not (pp stage inputs and
  one micro-batch's backward). Measured: GPipe 14.8 MB at M = 4, 28.5 MB at M = 8; 1F1B 3.68 MB
  at both."""
  temp = {}
  for schedule, microbatches in (('gpipe', 4), ('gpipe', 8), ('1f1b', 4), ('1f1b', 8)):
    config = tp_pp_config(
      8,
      2,
      microbatches,
      **{
        'parallel.pp_schedule': schedule,
        'data.seq_len': 64,
        'data.batch_size': 4 * microbatches,
        'model.num_layers': 2,
      },
    )
    temp[schedule, microbatches] = _value_and_grad_temp_bytes(config)
  assert temp['gpipe', 8] > 1.5 * temp['gpipe', 4], temp
  assert temp['1f1b', 8] < 1.05 * temp['1f1b', 4], temp
  assert temp['1f1b', 8] < 0.3 * temp['gpipe', 8], temp
