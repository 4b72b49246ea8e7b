"""parallel.grad_compression='topk' (mas_jax/compression.py): top-K all-reduce, error feedback.

With topk_fraction=1 every strategy that has a data-parallel all-reduce (dp, ep, ma_sep) logs the
losses of the uncompressed run; the compressed all-reduce conserves gradient mass across calls
through the residual (the test fails without error feedback); with 1% of the entries the tiny
model still learns as well over 300 steps (tests/test_compression_learning.py); bad settings
are one-line errors.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_close, tiny_config
from jax.sharding import PartitionSpec as P

from mas_jax import compression, train_lib, zero
from mas_jax import config as config_lib
from mas_jax.config import ConfigError

pytestmark = pytest.mark.timeout(600)

# Accumulation 2: the residual is carried from chunk to chunk as well as from step to step.
SMALL = {'data.seq_len': 16, 'data.batch_size': 32, 'train.grad_accum_steps': 2}
PLACEMENTS = {'dp': {}, 'ep': {'parallel.ep': 8}, 'ma_sep': {'parallel.num_microbatches': 2}}


def _losses(strategy: str, steps: int, **overrides):
  """(losses, final state) of `steps` train steps on fixed random batches."""
  from test_shard_optimizer import _train

  cd = tiny_config(**SMALL, **PLACEMENTS[strategy], **overrides, **{'parallel.strategy': strategy})
  losses, _, state, _ = _train(config_lib.from_config_dict(cd), steps)
  return losses, state


def test_topk_fraction_one_logs_the_uncompressed_losses():
  """ma_sep, 3 steps of 2 accumulation chunks: the train state's plumbing (residual carried
  through chunks and steps) with everything sent."""
  plain, _ = _losses('ma_sep', 3)
  compressed, state = _losses(
    'ma_sep', 3, **{'parallel.grad_compression': 'topk', 'parallel.topk_fraction': 1.0}
  )
  np.testing.assert_allclose(compressed, plain, rtol=1e-6)
  # Everything was sent: nothing is left over.
  assert all(float(jnp.abs(r).max()) == 0.0 for r in jax.tree.leaves(state['residual']))


def test_topk_fraction_one_gives_the_uncompressed_gradients():
  """ep 8x2, one batch: loss, metrics and gradients of the compressed all-reduce sending every
  entry equal the psum's within 1e-6, and the new residual is zero. (dp's compressed path runs
  in the tests below and in tests/test_compression_learning.py.)"""
  strategy = 'ep'
  from strategy_harness import _inputs

  from mas_jax import strategies

  def make(**extra):
    fields = {**SMALL, 'train.grad_accum_steps': 1, **PLACEMENTS[strategy], **extra}
    return config_lib.from_config_dict(tiny_config(**fields, **{'parallel.strategy': strategy}))

  config = make()
  compressed_config = make(**{'parallel.grad_compression': 'topk', 'parallel.topk_fraction': 1.0})
  strategy_ = strategies.get(compressed_config)
  layout = zero.ParamLayout(compressed_config, strategy_)
  params, batch = _inputs(config)
  params = jax.jit(strategy_.from_reference)(params)
  residual = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), layout.residual_abstract())
  key = jax.random.key(7)
  plain = jax.jit(lambda p, b: strategies.get(config).value_and_grad(p, b, key))(params, batch)
  out, grads, new_residual = jax.jit(
    lambda p, b, r: strategy_.value_and_grad_compressed(p, b, key, r)
  )(params, batch, residual)
  assert_trees_close((out, grads), plain, rtol=1e-6, atol=1e-7)
  assert all(float(jnp.abs(r).max()) == 0.0 for r in jax.tree.leaves(new_residual))


def test_a_compressed_step_keeps_a_residual_per_device():
  losses, state = _losses(
    'dp', 2, **{'parallel.grad_compression': 'topk', 'parallel.topk_fraction': 0.01}
  )
  residual = state['residual']['embed']  # [16, V, D]: one per device
  assert residual.shape[0] == 16
  assert residual.sharding.spec == P(('data',))
  # Each device keeps its own unsent gradient: nonzero, and not the same on every device.
  per_device = np.abs(np.asarray(residual)).sum(axis=(1, 2))
  assert (per_device > 0).all() and len(set(per_device.round(6))) > 1


@pytest.fixture(scope='module')
def mesh():
  return jax.make_mesh((4,), ('d',), devices=jax.devices()[:4])


def test_topk_allreduce_conserves_the_gradient_through_the_residual(mesh):
  """Two calls with the same local gradients g (4 devices, k = 3 of 10 entries): what was sent
  plus what is left equals 2 g on every device, the dense sum is the sum of what each device
  sent, and the second call sends entries the first held back. Fails if the residual is
  dropped (not kept, or not added back)."""
  g = jax.device_put(
    jax.random.normal(jax.random.key(0), (4, 10)), jax.sharding.NamedSharding(mesh, P('d'))
  )

  def two_calls(g):
    g = g[0]
    r0 = jnp.zeros_like(g)
    total1, r1 = compression.topk_allreduce(g, r0, 3, ('d',))
    total2, r2 = compression.topk_allreduce(g, r1, 3, ('d',))
    sent1, sent2 = g + r0 - r1, g + r1 - r2
    return (
      total1[None],
      total2[None],
      jax.lax.psum(sent1, 'd')[None],
      jax.lax.psum(sent2, 'd')[None],
      sent1[None],
      sent2[None],
      r2[None],
    )

  run = jax.jit(jax.shard_map(two_calls, mesh=mesh, in_specs=P('d'), out_specs=P('d')))
  total1, total2, psum1, psum2, sent1, sent2, r2 = map(np.asarray, run(g))
  np.testing.assert_allclose(sent1 + sent2 + r2, 2 * np.asarray(g), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(total1, psum1, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(total2, psum2, rtol=1e-6, atol=1e-6)
  assert ((sent1 != 0).sum(axis=1) == 3).all() and ((sent2 != 0).sum(axis=1) == 3).all()
  # The residual is carried: the second call sends at least one entry the first kept back.
  assert ((sent2 != 0) & (sent1 == 0)).any()


@pytest.mark.parametrize(
  'overrides, message',
  [
    ({'parallel.grad_compression': 'fp8'}, "parallel.grad_compression='fp8' is not one of"),
    ({'parallel.topk_fraction': 0.0}, 'parallel.topk_fraction=0.0 must be in (0, 1]'),
    ({'parallel.topk_fraction': 1.5}, 'parallel.topk_fraction=1.5 must be in (0, 1]'),
    (
      {'parallel.grad_compression': 'topk', 'parallel.strategy': 'tp_pp'},
      "parallel.strategy='tp_pp' has none",
    ),
  ],
)
def test_bad_settings_are_one_line_errors(overrides, message):
  with pytest.raises(ConfigError, match=message.replace('(', r'\(').replace(')', r'\)')) as e:
    config_lib.from_config_dict(tiny_config(**overrides))
  assert '\n' not in str(e.value)


def test_grad_compression_bench_smoke(tmp_path, monkeypatch):
  """bench/grad_compression.py --smoke: dp with topk_fraction 0.01 receives under a third of the
  plain all-reduce's bytes (all-gathers of (index, value) pairs instead), for a little more
  compute (the top-k and the scatter-add)."""
  import json
  import sys

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'bench'))
  import grad_compression

  out = tmp_path / 'grad_compression.json'
  monkeypatch.setattr(sys, 'argv', ['grad_compression.py', '--smoke', '--out', str(out)])
  grad_compression.main()
  plain, topk = json.loads(out.read_text())['rows']
  assert (plain['compression'], topk['compression']) == ('none', 'topk')
  assert set(plain['collective_bytes']) == {'all-reduce/16'}
  assert 'all-gather/16' in topk['collective_bytes']
  assert topk['wire_bytes'] < plain['wire_bytes'] / 3
  assert topk['flops'] > plain['flops']


def test_the_residual_is_checkpointed(sample_dir, tmp_path):
  """4 dp steps straight == 2 steps, restart from the step-2 checkpoint, 2 more: bit for bit.
  Step 4's loss follows step 3's update, which adds the residual kept at step 2: a restart that
  lost the residual would log another loss."""
  import shutil

  from conftest import read_metrics

  config = tiny_config(
    **{
      'parallel.strategy': 'dp',
      'parallel.grad_compression': 'topk',
      'data.data_dir': sample_dir,
      'data.seq_len': 16,
      'data.batch_size': 16,
      'data.prefetch': 0,
      'train.steps': 4,
      'train.log_every': 1,
      'train.eval_every': 4,
      'train.eval_steps': 1,
      'train.checkpoint_every': 2,
    }
  )
  straight = str(tmp_path / 'straight')
  train_lib.train_and_evaluate(config, straight)
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(straight, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '4'))
  train_lib.train_and_evaluate(config, resumed)
  losses = [[r['loss'] for r in read_metrics(w)] for w in (straight, resumed)]
  assert len(losses[0]) == 4 and losses[0] == losses[1]
