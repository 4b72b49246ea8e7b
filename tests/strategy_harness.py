"""Compares a strategy's loss, metrics and gradients with the single-device reference model."""

from __future__ import annotations

import collections
import dataclasses
import functools

import jax
import numpy as np
from conftest import assert_trees_close, tiny_config

from mas_jax import config as config_lib
from mas_jax import strategies, train_lib

# Tolerance of the issue: fp32, relative error <= 1e-5.
RTOL = 1e-5


def small_config(**overrides) -> config_lib.Config:
  """The tiny model at test size: 2 layers, 16 sequences of 16 tokens, fp32."""
  base = {'data.seq_len': 16, 'data.batch_size': 16, 'data.source': 'synthetic'}
  return config_lib.from_config_dict(tiny_config(**{**base, **overrides}))


@functools.lru_cache(maxsize=8)
def _inputs(config: config_lib.Config):
  params = train_lib.init_params(config)
  batch = np.random.default_rng(0).integers(
    0, config.model.vocab_size, (config.data.batch_size, config.data.seq_len + 1), dtype=np.int32
  )
  return params, batch


# The latest compiled steps of `run` by (config, dropout) on all devices, for tests that read the
# compiled program (`compiled_step`) of a config another test ran: one compile for both.
_COMPILED: collections.OrderedDict = collections.OrderedDict()


def run(config: config_lib.Config, devices=None, dropout: bool = True):
  """((loss, metrics), grads) of `config`'s strategy on fixed params and batch, jitted."""
  strategy = strategies.get(config, devices)
  params, batch = _inputs(config)
  params = jax.jit(strategy.from_reference)(params)
  params = jax.device_put(params, strategy.param_shardings(params))
  batch = jax.device_put(batch, strategy.batch_sharding())
  key = jax.random.key(7) if dropout else None

  def step(p, b):
    (loss, metrics), grads = strategy.value_and_grad(p, b, key)
    return (loss, metrics), strategy.to_reference(grads)

  compiled = jax.jit(step).lower(params, batch).compile()
  if devices is None:
    _COMPILED[config, dropout] = compiled
    while len(_COMPILED) > 8:
      _COMPILED.popitem(last=False)
  return jax.device_get(compiled(params, batch))


def compiled_step(config: config_lib.Config, dropout: bool = True):
  """The compiled program of `run(config, dropout=dropout)` (forward, backward and the gradients'
  conversion to the reference layout): the one a test already ran, else compiled now."""
  if (config, dropout) not in _COMPILED:
    run(config, dropout=dropout)
  return _COMPILED[config, dropout]


@functools.lru_cache(maxsize=8)
def _reference(config: config_lib.Config, dropout: bool):
  return run(config, dropout=dropout)


def assert_matches_reference(config: config_lib.Config, devices=None, dropout: bool = True):
  (loss, metrics), grads = run(config, devices, dropout)
  # The reference depends on the model, data and seed only: share it between strategy tests.
  reference = dataclasses.replace(
    config, parallel=config_lib.ParallelConfig('reference', 1, 1, 1, False, 1, 1, 1)
  )
  (ref_loss, ref_metrics), ref_grads = _reference(reference, dropout)
  assert_trees_close(loss, ref_loss, RTOL)
  assert_trees_close(metrics, ref_metrics, RTOL, atol=1e-7)
  assert_trees_close(grads, ref_grads, RTOL)
  return metrics
