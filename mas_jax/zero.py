"""How the train state holds the parameters: `ParamLayout`, and ZeRO-style optimizer sharding.

By default (`parallel.shard_optimizer=False`) the train state holds float32 parameters in the
strategy's layout and shardings (ma_sep's head and expert slots, dummy slots included), and the
AdamW moments follow them: every device holds the master weights and moments of whatever it
holds, read or not.

With `parallel.shard_optimizer=True`, for every strategy (ZeRO-1/2):
  - the float32 master weights and both moments are held in the *reference* layout (no dummy
    slots, no padded heads), each array split over all devices of the mesh along one dimension
    (`zero_spec`), so each device holds 1/n of the optimizer state and updates only that;
  - each step first builds the compute copy: the master weights cast to `model.compute_dtype`
    (norm scales stay float32, as the model reads them), put into the strategy's layout
    (`strategy.from_reference`) and constrained to the strategy's shardings, which makes XLA
    all-gather (or permute) each device's share of the weights it reads, once per step;
  - the gradients of each accumulation chunk are taken with respect to that copy, mapped back
    through the transpose of the same function, and constrained to the master's sharding, which
    makes XLA reduce-scatter them into one float32 accumulator of 1/n per device.
Dummy slots (ma_sep's expert slots on attention devices) then exist only in the compute copy, in
the compute dtype, for the step's duration.

That is ZeRO-2: with accumulation, every chunk's gradients move to the master's layout. With
`parallel.shard_gradients=False` (ZeRO-1) the chunks' gradients are summed in float32 in the
compute layout instead and mapped to the master once per step: fewer bytes moved (once instead
of once per chunk), one float32 gradient buffer of the strategy's layout more (dummy slots
included). Gradients of replicated weights are reduced in the
compute dtype (in float32 without sharding): equal in float32, half the bytes in bfloat16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mas_jax import model as model_lib
from mas_jax.config import Config, ConfigError


def _name(path) -> str:
  return '.'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def zero_spec(name: str, shape: tuple[int, ...], preferred: P, mesh: jax.sharding.Mesh) -> P:
  """The PartitionSpec splitting an array of `shape` over all of `mesh`'s devices on one axis.

  The axis is the first one the strategy shards (`preferred`, its spec in the strategy layout,
  whose axes line up with the reference layout's) that the device count divides, else the
  largest axis it divides: the compute copy is then gathered along the axis the strategy splits,
  over the mesh axes the strategy does not split it on.

  Raises:
    ConfigError: no axis of the array divides over the devices (one line naming both).
  """
  n = mesh.size
  if n == 1:
    return P()
  spec = tuple(preferred) + (None,) * (len(shape) - len(tuple(preferred)))
  sharded = [i for i, s in enumerate(spec) if s is not None]
  by_size = sorted(range(len(shape)), key=lambda i: -shape[i])
  for i in sharded + by_size:
    if shape[i] % n == 0:
      # The strategy's own axes of that dimension first, the others after: each device's
      # master shard then lies inside its own compute shard, and the compute copy is gathered
      # over the other axes only (no permutation).
      own = spec[i] if isinstance(spec[i], tuple) else (spec[i],) if spec[i] else ()
      axes = own + tuple(a for a in mesh.axis_names if a not in own)
      return P(*([None] * i), axes)
  raise ConfigError(
    f'parallel.shard_optimizer: no axis of params.{name} {list(shape)} divides over {n} devices'
  )


def _compute_dtype(name: str, x: jax.Array, dtype) -> jax.Array:
  """The compute copy's leaf: norm scales stay float32 (the model normalises in float32)."""
  return x if name.endswith('scale') else x.astype(dtype)


class ParamLayout:
  """The train state's parameter layout for `strategy`: the strategy's own, or ZeRO-sharded."""

  def __init__(self, config: Config, strategy):
    self.config = config
    self.strategy = strategy
    self.sharded = bool(config.parallel.shard_optimizer)
    self._reference = jax.eval_shape(lambda: model_lib.init_params(config))
    self._strategy_abstract = jax.eval_shape(strategy.from_reference, self._reference)
    self._strategy_specs = strategy.param_specs(self._strategy_abstract)
    if self.sharded:
      # Checked here, before any work: an array no axis of which divides is a one-line error.
      self._zero_specs = jax.tree_util.tree_map_with_path(
        lambda path, a, s: zero_spec(_name(path), a.shape, s, strategy.mesh),
        self._reference,
        self._strategy_specs,
      )

  def init(self) -> dict:
    """Freshly initialised parameters in this layout (traceable; jit with `shardings()`)."""
    params = model_lib.init_params(self.config)
    return params if self.sharded else self.strategy.from_reference(params)

  def abstract(self) -> dict:
    return self._reference if self.sharded else self._strategy_abstract

  def specs(self) -> dict:
    return self._zero_specs if self.sharded else self._strategy_specs

  def shardings(self) -> dict:
    return jax.tree.map(lambda s: NamedSharding(self.strategy.mesh, s), self.specs())

  def residual_abstract(self) -> dict | None:
    """Shapes of parallel.grad_compression='topk''s error-feedback residuals ([n, *shape]
    float32 for every parameter the strategy holds whole on each device, None for the rest;
    mas_jax/compression.py), or None without compression."""
    if self.config.parallel.grad_compression != 'topk':
      return None
    n = self.strategy.mesh.size
    return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct((n, *x.shape), jnp.float32) if s == P() else None,
      self._strategy_abstract,
      self._strategy_specs,
    )

  def residual_shardings(self) -> dict:
    """Each device its own residual: the leading axis over every mesh axis."""
    mesh = self.strategy.mesh
    return jax.tree.map(
      lambda _: NamedSharding(mesh, P(tuple(mesh.axis_names))), self.residual_abstract()
    )

  def describe(self) -> str:
    """One start-up line: where the optimizer state lives."""
    if not self.sharded:
      return 'Optimizer state: follows the parameters (parallel.shard_optimizer=False).'
    shardings = self.shardings()
    per_device = sum(
      int(np.prod(sh.shard_shape(a.shape))) * 4
      for a, sh in zip(jax.tree.leaves(self.abstract()), jax.tree.leaves(shardings), strict=True)
    )
    n = self.strategy.mesh.size
    return (
      f'Optimizer state: sharded over {n} devices (parallel.shard_optimizer=True); each holds '
      f'{per_device // 4 * self.config.train.state_bytes_per_param / 1e6:.4g} MB of float32 '
      f'master weights and AdamW moments (first moment {self.config.train.mu_dtype}), and the step '
      f'gathers a {self.config.model.compute_dtype} compute copy in the strategy layout.'
    )

  def placement_abstract(self) -> jax.ShapeDtypeStruct | None:
    """With parallel.rebalance_every (ma_sep): the expert -> slot table [E] int32 that the
    strategy-layout parameters are placed by (mas_jax/rebalance.py); None otherwise."""
    if not self.config.parallel.rebalance_every:
      return None
    return jax.ShapeDtypeStruct((self.config.model.num_experts,), jnp.int32)

  def _strategy_from_reference(self, params, placement):
    extra = () if placement is None else (placement,)
    return self.strategy.from_reference(params, *extra)

  def to_compute(self, params: dict, placement=None) -> dict:
    """The parameters the strategy's loss takes: without sharding `params` themselves; with
    it the compute-dtype copy in the strategy's layout and shardings, its experts placed by
    `placement` where given (traceable)."""
    if not self.sharded:
      return params
    dtype = jnp.dtype(self.config.model.compute_dtype)
    cast = jax.tree_util.tree_map_with_path(
      lambda path, x: _compute_dtype(_name(path), x, dtype), params
    )
    compute = self._strategy_from_reference(cast, placement)
    return jax.lax.with_sharding_constraint(compute, self.strategy.param_shardings(compute))

  def to_strategy_layout(self, params: dict, placement=None) -> dict:
    """The master weights in the strategy's layout and shardings, in their own dtype
    (traceable; its transpose maps float32 gradients of the compute copy to the master)."""
    out = self._strategy_from_reference(params, placement)
    return jax.lax.with_sharding_constraint(out, self.strategy.param_shardings(out))

  def constrain(self, grads: dict) -> dict:
    """Gradients in this layout's shardings (with sharding: the reduce-scatter)."""
    return jax.lax.with_sharding_constraint(grads, self.shardings())

  def to_reference(self, params: dict, placement=None) -> dict:
    if self.sharded:
      return params
    extra = () if placement is None else (placement,)
    return self.strategy.to_reference(params, *extra)

  def from_reference(self, params: dict, placement=None) -> dict:
    return params if self.sharded else self._strategy_from_reference(params, placement)

  def move_experts(self, tree: dict, old, new) -> dict:
    """A parameter-shaped tree with its experts moved from table `old`'s slots to `new`'s
    (`MASeparation.move_experts`); the sharded master is in the reference layout: unchanged."""
    return tree if self.sharded else self.strategy.move_experts(tree, old, new)

  def convert_state(self, state: dict, source: ParamLayout, placement=None) -> dict:
    """A train state saved in `source`'s layout, in this one (its experts placed by
    `placement` in both, where given): the params and every parameter-shaped part of the
    optimizer state (AdamW's moments; dummy slots are zero in both, so the conversion is
    exact). Traceable; jit it with this layout's state shardings."""
    params_def = jax.tree.structure(source.abstract())

    def convert(tree):
      return self.from_reference(source.to_reference(tree, placement), placement)

    def is_params(x):
      return jax.tree.structure(x) == params_def

    return jax.tree.map(lambda x: convert(x) if is_params(x) else x, state, is_leaf=is_params)
