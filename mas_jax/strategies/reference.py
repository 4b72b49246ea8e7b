"""`reference`: the whole model on one device; the oracle every other strategy is tested against."""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from mas_jax import model as model_lib
from mas_jax.strategies import base


class Reference(base.Strategy):
  """Runs `model.loss_fn` on the first device."""

  name = 'reference'

  def __init__(self, config, devices=None):
    super().__init__(config, devices)
    self._mesh = jax.make_mesh(
      (1,), ('data',), devices=self.devices[:1], axis_types=(jax.sharding.AxisType.Auto,)
    )

  @property
  def mesh(self):
    return self._mesh

  def param_specs(self, params):
    return jax.tree.map(lambda _: P(), params)

  def batch_spec(self):
    return P()

  def loss(self, params, batch, dropout_key, residual=None):
    return model_lib.loss_fn(self.config.model, params, batch, dropout_key)

  def forward_cached(self, params, cache, tokens, start):
    return model_lib.forward_cached(self.config.model, params, cache, tokens, start)
