"""train_and_evaluate on the tiny config with the generated C4 sample, and bit-exact resume."""

import os
import shutil

import jax
import numpy as np
import pytest
from conftest import assert_trees_close, read_metrics, restore_state, tiny_config
from strategy_harness import _inputs, small_config

from mas_jax import config as config_lib
from mas_jax import strategies, train_lib, zero

OVERRIDES = {
  'data.seq_len': 32,
  'data.batch_size': 4,
  'train.steps': 6,
  'train.log_every': 1,
  'train.eval_every': 3,
  'train.eval_steps': 2,
  'train.checkpoint_every': 3,
  'train.keep_checkpoints': 3,
}


@pytest.fixture(scope='module')
def straight_run(sample_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('straight'))
  config = tiny_config(**OVERRIDES, **{'data.data_dir': sample_dir})
  last = train_lib.train_and_evaluate(config, workdir)
  return workdir, config, last


def test_train_and_evaluate_writes_metrics(straight_run):
  workdir, _, last = straight_run
  records = read_metrics(workdir)
  assert [r['step'] for r in records] == [1, 2, 3, 4, 5, 6]
  for key in (
    'loss',
    'aux_loss',
    'z_loss',
    'dropped_token_fraction',
    'expert_load_0',
    'expert_load_15',
    'learning_rate',
    'grad_norm',
    'tokens_per_sec',
    'step_time_s',
    'mfu',
  ):
    assert key in records[-1], key
  assert 'eval_loss' in records[2] and 'eval_loss' in records[5]
  assert np.isclose(sum(records[-1][f'expert_load_{e}'] for e in range(16)), 1.0)
  assert np.isfinite(last['loss']) and last['learning_rate'] > 0
  assert os.path.exists(os.path.join(workdir, 'config.json'))
  assert os.listdir(os.path.join(workdir, 'tensorboard'))


def test_resume_is_bit_exact(straight_run):
  """6 steps straight == 3 steps, restart from the step-3 checkpoint, 3 more steps."""
  workdir, config, _ = straight_run
  final = restore_state(workdir, 6)
  resumed_dir = workdir + '_resumed'
  shutil.copytree(workdir, resumed_dir)
  shutil.rmtree(os.path.join(resumed_dir, 'checkpoints', '6'))
  train_lib.train_and_evaluate(config, resumed_dir)
  again = restore_state(resumed_dir, 6)
  for a, b in zip(_leaves(final), _leaves(again), strict=True):
    np.testing.assert_array_equal(a, b)
  straight, resumed = read_metrics(workdir), read_metrics(resumed_dir)
  assert [r['step'] for r in resumed] == [1, 2, 3, 4, 5, 6]  # steps 4-6 once, not twice
  for a, b in zip(straight, resumed, strict=True):
    assert (a['loss'], a['grad_norm']) == (b['loss'], b['grad_norm'])


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize('strategy', ['reference', 'dp'])
def test_gradient_accumulation_matches_one_big_batch(strategy):
  """Mean of 2 micro-batches' losses and gradients == the whole batch's (no dropout)."""
  overrides = {'parallel.strategy': strategy, 'data.batch_size': 32}
  big = small_config(**overrides)
  accum = small_config(**overrides, **{'train.grad_accum_steps': 2})
  params, batch = _inputs(big)
  full = strategies.get(big)
  micro = strategies.get(train_lib.micro_config(accum))
  expected = jax.jit(lambda p, b: full.value_and_grad(p, b, None))(params, batch)
  actual = jax.jit(lambda p, b: train_lib.accumulate(micro.value_and_grad, p, b, None, steps=2))(
    params, batch
  )
  assert_trees_close(actual, expected, rtol=1e-5, atol=1e-7)


def _one_step(config, monkeypatch=None):
  strategy = strategies.get(config, jax.devices()[:1])
  tx = train_lib.make_optimizer(config.train)
  layout = zero.ParamLayout(config, strategy)
  state, shardings = train_lib.create_train_state(layout, tx)
  step = train_lib.make_train_step(config, layout, tx, shardings)
  batch = jax.device_put(_inputs(config)[1], strategy.batch_sharding())
  return step, state, batch


@pytest.mark.timeout(120)
def test_casting_the_weights_once_per_step_changes_no_value(monkeypatch):
  """One device, 2 micro-batches, bfloat16 compute: the step that casts the matmul weights once
  (train_lib.cast_matmul_weights) gives bit-for-bit the state and metrics of the step that casts
  them in every micro-batch."""
  config = small_config(
    **{'parallel.strategy': 'reference', 'train.grad_accum_steps': 2},
    **{'model.compute_dtype': 'bfloat16', 'model.expert_dropout': 0.0, 'model.num_layers': 1},
  )
  step, state, batch = _one_step(config)
  cast = jax.eval_shape(
    lambda p: train_lib.cast_matmul_weights(p, jax.numpy.bfloat16), state['params']
  )
  kept = {k for k, v in _named(cast).items() if v.dtype == np.float32}
  assert kept and all(k == 'embed' or k.endswith('scale') for k in kept), kept
  assert len(kept) < len(_named(cast))
  once = step(state, batch)
  monkeypatch.setattr(train_lib, 'cast_matmul_weights', lambda params, dtype: params)
  step, state, batch = _one_step(config)
  every = step(state, batch)
  for a, b in zip(_leaves(once), _leaves(every), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.timeout(120)
def test_fused_gradient_accumulation_matches_the_separate_sum():
  """train.fuse_grad_accum (the expert weight-gradient GEMMs add into the float32 accumulator)
  gives the loss and, after one AdamW step, the parameters of the step without it.

  Not bit-exact: without the flag each micro-batch's expert weight gradient is rounded to
  bfloat16 (relative 2^-9) before the float32 sum; with it, it is summed unrounded (the summed
  expert gradients differ by about 2e-3 in relative norm here, every other gradient is
  bit-equal). The loss is the forward's: equal. AdamW's first update is lr * g / (|g| + eps),
  +-lr whatever g's size, so entries move alike except where the two sums of a gradient that
  nearly cancels over the micro-batches differ in sign (|g| ~ 1e-6 against a mean of 4e-4): at
  most 2 lr there, and such entries are rare (under 1%; 173 of the 131072 entries of w_in here).
  """
  overrides = {
    **{'parallel.strategy': 'reference', 'train.grad_accum_steps': 2},
    **{'model.compute_dtype': 'bfloat16', 'model.num_layers': 1},
    'train.warmup_steps': 0,  # the first step at the peak learning rate, not at 0
  }
  config = small_config(**overrides)
  fused = small_config(**overrides, **{'train.fuse_grad_accum': True})
  step, state, batch = _one_step(config)
  lr = float(train_lib.learning_rate_schedule(config.train)(0))
  before = {k: np.asarray(v) for k, v in _named(state['params']).items()}  # state is donated
  new, metrics = step(state, batch)
  step, state, batch = _one_step(fused)
  new_fused, metrics_fused = step(state, batch)
  assert float(metrics_fused['loss']) == float(metrics['loss'])
  np.testing.assert_allclose(metrics_fused['grad_norm'], metrics['grad_norm'], rtol=2**-8)
  for name, a in _named(new_fused['params']).items():
    a, b = np.asarray(a), np.asarray(_named(new['params'])[name])
    assert np.any(a != before[name]), name
    diff = np.abs(a - b)
    assert diff.max() <= 2.001 * lr, (name, diff.max() / lr)
    assert np.mean(diff > 0.01 * lr) < 0.01, (name, np.mean(diff > 0.01 * lr))


def test_fused_gradient_accumulation_needs_one_device_and_accumulation():
  """train.fuse_grad_accum where it cannot apply: a one-line ConfigError naming the values."""
  fuse = {'parallel.strategy': 'reference', 'train.fuse_grad_accum': True, 'model.num_layers': 1}
  for bad, named in (
    ({'train.grad_accum_steps': 1}, 'grad_accum_steps=1'),
    ({'model.num_layers': 2}, 'num_layers=2'),
    ({'model.expert_impl': 'ragged_dot', 'model.expert_dropout': 0.0}, "expert_impl='ragged_dot'"),
  ):
    with pytest.raises(config_lib.ConfigError, match=named) as err:
      small_config(**{**fuse, 'train.grad_accum_steps': 2, **bad})
    assert '\n' not in str(err.value)
  config = small_config(**fuse, **{'train.grad_accum_steps': 2})
  layout = zero.ParamLayout(config, strategies.get(config, jax.devices()[:2]))
  with pytest.raises(config_lib.ConfigError, match='got 2 devices'):
    train_lib.casts_once(config, layout)


def _named(tree) -> dict:
  return {zero._name(path): x for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _unigram_entropy(source, num_batches: int) -> float:
  """Entropy (nats) of the token frequencies of the first train batches: what a model that
  ignores context can reach at best on this data."""
  counts = np.zeros(source.tokenizer.get_piece_size(), np.int64)
  for _, (batch, _) in zip(range(num_batches), source.train_batches(), strict=False):
    np.add.at(counts, batch[:, 1:].reshape(-1), 1)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


@pytest.mark.timeout(240)
def test_the_tiny_model_learns_more_than_unigram_statistics(sample_dir, tmp_path):
  """200 steps bring the eval loss below the sample's unigram entropy (a model that learns
  nothing, or only token frequencies, cannot pass)."""
  from mas_jax import config as config_lib
  from mas_jax.data import get_source

  cd = tiny_config(
    **{
      'data.data_dir': sample_dir,
      'data.seq_len': 32,
      'data.batch_size': 8,
      'data.prefetch': 0,
      'train.steps': 200,
      'train.log_every': 50,
      'train.eval_every': 200,
      'train.eval_steps': 4,
      'train.checkpoint_every': 200,
    }
  )
  entropy = _unigram_entropy(get_source(config_lib.from_config_dict(cd)), num_batches=200)
  last = train_lib.train_and_evaluate(cd, str(tmp_path / 'learn'))
  first = read_metrics(str(tmp_path / 'learn'))[0]['loss']
  assert first > entropy + 0.2, (first, entropy)  # it starts near log(vocab) = 6.24
  assert last['eval_loss'] < entropy - 0.3, (last['eval_loss'], entropy)
