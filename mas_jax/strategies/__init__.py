"""Strategy registry: `config.parallel.strategy` -> a `base.Strategy` subclass.

The only place that maps names to strategies; train_lib and the tests go through `get`.
"""

from __future__ import annotations

from mas_jax.config import Config, ConfigError
from mas_jax.strategies import base
from mas_jax.strategies.dp import DataParallel
from mas_jax.strategies.ep import ExpertParallel
from mas_jax.strategies.ma_separation import MASeparation
from mas_jax.strategies.reference import Reference
from mas_jax.strategies.tp_pp import TensorPipeline

REGISTRY: dict[str, type[base.Strategy]] = {
  Reference.name: Reference,
  DataParallel.name: DataParallel,
  MASeparation.name: MASeparation,
  ExpertParallel.name: ExpertParallel,
  TensorPipeline.name: TensorPipeline,
}


def get(config: Config, devices: list | None = None) -> base.Strategy:
  """Builds the strategy config.parallel.strategy names (it validates its own shape)."""
  name = config.parallel.strategy
  if name not in REGISTRY:
    raise ConfigError(f'parallel.strategy={name!r} is not one of {sorted(REGISTRY)}')
  if auto := config.parallel.auto_fields:
    raise ConfigError(
      f"parallel.{auto[0]}='auto' is not resolved: train.py resolves it with the planner "
      '(mas_jax.train_lib.resolve_auto_placement); elsewhere give it a number'
    )
  return REGISTRY[name](config, devices)
