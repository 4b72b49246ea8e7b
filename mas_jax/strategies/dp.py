"""`dp`: data parallelism; parameters replicated, the batch sharded by sequence over all devices.

Each device runs the reference per-device math on its sequences inside `jax.shard_map`; the
loss sums are psum-ed over 'data'. Parameters enter replicated (invariant), so the transpose of
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

  def loss(self, params, batch, dropout_key):
    cfg = self.config
    local_b = cfg.data.batch_size // self.mesh.shape[DATA_AXIS]

    def local_loss(params, batch_local, key):
      # batch_local: i32[B/n, T+1]
      offset = lax.axis_index(DATA_AXIS) * local_b
      ce_sum, stats = model_lib.loss_sums(cfg.model, params, batch_local, key, offset)
      # sums[..]{U_data} -> sums[..]: the global batch's cross entropy and routing statistics.
      ce_sum, stats = lax.psum((ce_sum, stats), DATA_AXIS)
      return base.finalize(cfg, ce_sum, stats)

    return jax.shard_map(
      local_loss, mesh=self.mesh, in_specs=(P(), P(DATA_AXIS), P()), out_specs=(P(), P())
    )(params, batch, dropout_key)
