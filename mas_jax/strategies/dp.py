"""`dp`: data parallelism; parameters replicated, the batch sharded by sequence over all devices.

Each device runs the reference per-device math on its sequences inside `jax.shard_map`; the
loss sums are psum-ed over 'data'. Generation shards the sequences and their KV cache the same
way, with no collective at all. Parameters enter replicated (invariant), so the transpose of
their implicit broadcast in the backward pass is the gradient all-reduce.
"""

from __future__ import annotations

import jax
from jax import lax
from jax.sharding import PartitionSpec as P

from mas_jax import model as model_lib
from mas_jax.strategies import base

DATA_AXIS = 'data'


class DataParallel(base.Strategy):
  name = 'dp'

  def __init__(self, config, devices=None):
    super().__init__(config, devices)
    n = len(self.devices)
    self.check_batch(n, 'devices')
    self._mesh = jax.make_mesh(
      (n,), (DATA_AXIS,), devices=self.devices, axis_types=(jax.sharding.AxisType.Auto,)
    )

  @property
  def mesh(self):
    return self._mesh

  def param_specs(self, params):
    return jax.tree.map(lambda _: P(), params)

  def batch_spec(self):
    return P(DATA_AXIS)

  def loss(self, params, batch, dropout_key, residual=None):
    cfg = self.config
    local_b = cfg.data.batch_size // self.mesh.shape[DATA_AXIS]

    def local_loss(params, batch_local, key):
      # batch_local: i32[B/n, T+1]
      offset = lax.axis_index(DATA_AXIS) * local_b
      ce_sum, stats = model_lib.loss_sums(cfg.model, params, batch_local, key, offset)
      # sums[..]{U_data} -> sums[..]: the global batch's cross entropy and routing statistics.
      ce_sum, stats = lax.psum((ce_sum, stats), DATA_AXIS)
      return base.finalize(cfg, ce_sum, stats)

    return self.shard_loss(local_loss, params, batch, dropout_key, residual)

  def decode_batch_multiple(self):
    return self.mesh.shape[DATA_AXIS]

  def cache_spec(self):
    return P(None, DATA_AXIS)  # [L, B, S, N, H]: each device the cache of its sequences

  def forward_cached(self, params, cache, tokens, start):
    mcfg = self.config.model
    cache_specs = {'k': self.cache_spec(), 'v': self.cache_spec()}
    out_specs = (P(DATA_AXIS), cache_specs)
    if start is None:
      return jax.shard_map(
        lambda p, c, t: model_lib.forward_cached(mcfg, p, c, t, None),
        mesh=self.mesh,
        in_specs=(P(), cache_specs, P(DATA_AXIS)),
        out_specs=out_specs,
      )(params, cache, tokens)
    return jax.shard_map(
      lambda p, c, t, s: model_lib.forward_cached(mcfg, p, c, t, s),
      mesh=self.mesh,
      in_specs=(P(), cache_specs, P(DATA_AXIS), P(DATA_AXIS)),
      out_specs=out_specs,
    )(params, cache, tokens, start)
