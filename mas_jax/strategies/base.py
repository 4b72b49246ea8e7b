"""The interface every parallel strategy implements, and what they share.

A strategy owns placement: the mesh, how parameters and the batch are sharded, and a
`loss(params, batch, dropout_key, residual=None)` that returns `(loss, metrics)` equal to the
single-device reference model's, gradients included (`value_and_grad` differentiates it). A
strategy built on `jax.shard_map` runs its per-device program through `shard_loss`, which also
applies parallel.grad_compression to the replicated parameters (mas_jax/compression.py).
`train_lib` is strategy-agnostic: it jits one train step around `value_and_grad` with the
strategy's shardings, and the optimizer state is sharded like the parameters it belongs to.
"""

from __future__ import annotations

import abc
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mas_jax import compression
from mas_jax import model as model_lib
from mas_jax.config import Config, ConfigError


class Strategy(abc.ABC):
  """Placement of the model on devices; subclasses set `name` and implement the methods."""

  name: str = ''

  def __init__(self, config: Config, devices: list | None = None):
    self.config = config
    self.devices = list(devices if devices is not None else jax.devices())

  @property
  @abc.abstractmethod
  def mesh(self) -> jax.sharding.Mesh:
    """The device mesh."""

  @abc.abstractmethod
  def param_specs(self, params: dict) -> dict:
    """PartitionSpec of every parameter (params may be abstract)."""

  @abc.abstractmethod
  def batch_spec(self) -> P:
    """PartitionSpec of the packed batch [B, T + 1]."""

  @abc.abstractmethod
  def loss(
    self, params: dict, batch: jax.Array, dropout_key: jax.Array | None, residual=None
  ) -> tuple[jax.Array, dict]:
    """(loss, metrics) of the batch, equal to `model.loss_fn`; traced inside jit. `residual`
    (parallel.grad_compression='topk' only) is the error-feedback state of `shard_loss`."""

  def value_and_grad(
    self, params: dict, batch: jax.Array, dropout_key: jax.Array | None, placement=None
  ):
    """((loss, metrics), grads) of the batch. `placement`: ma_sep's expert -> slot table
    (parallel.rebalance_every), passed to `loss` where given."""
    extra = {} if placement is None else {'placement': placement}
    return jax.value_and_grad(self.loss, has_aux=True)(params, batch, dropout_key, **extra)

  def value_and_grad_compressed(self, params, batch, dropout_key, residual, placement=None):
    """((loss, metrics), grads, new residual) with parallel.grad_compression='topk': the
    replicated parameters' gradients are all-reduced compressed (mas_jax/compression.py) and
    the new residual comes back as the residual's "gradient"."""
    extra = {} if placement is None else {'placement': placement}
    out, (grads, new_residual) = jax.value_and_grad(self.loss, argnums=(0, 3), has_aux=True)(
      params, batch, dropout_key, residual, **extra
    )
    return out, grads, new_residual

  def shard_loss(self, local_loss, params, batch, dropout_key, residual=None, extra=None):
    """`jax.shard_map` of local_loss(params, batch, key) -> (loss, metrics) over this
    strategy's mesh, with its parameter and batch specs (key replicated, None passed through).

    With a `residual` the parameters every device holds whole enter through
    `compression.sync`: their gradients are all-reduced top-k compressed with error feedback.
    `extra` (an array, replicated) is passed on as local_loss's fourth argument where given."""
    specs = self.param_specs(params)
    axes = tuple(self.mesh.axis_names)
    fraction = self.config.parallel.topk_fraction
    has_key, has_residual = dropout_key is not None, residual is not None
    has_extra = extra is not None

    def program(params, batch, *rest):
      rest = list(rest)
      key = rest.pop(0) if has_key else None
      if has_residual:
        params = compression.sync(params, specs, rest.pop(0), fraction, axes)
      return local_loss(params, batch, key, *rest)

    in_specs, args = (specs, self.batch_spec()), (params, batch)
    if has_key:
      in_specs, args = (*in_specs, P()), (*args, dropout_key)
    if has_residual:
      in_specs = (*in_specs, compression.residual_specs(residual, axes))
      args = (*args, residual)
    if has_extra:
      in_specs, args = (*in_specs, P()), (*args, extra)
    return jax.shard_map(program, mesh=self.mesh, in_specs=in_specs, out_specs=(P(), P()))(*args)

  def from_reference(self, params: dict) -> dict:
    """Reference parameter layout -> this strategy's (e.g. padded head slots); traceable."""
    return params

  def to_reference(self, params: dict) -> dict:
    """This strategy's parameter (or gradient) layout -> the reference layout."""
    return params

  def param_shardings(self, params: dict) -> dict:
    return jax.tree.map(lambda s: NamedSharding(self.mesh, s), self.param_specs(params))

  def batch_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, self.batch_spec())

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def describe(self) -> str:
    """A few lines for the start-up log: mesh and placement."""
    return f'strategy={self.name} mesh={dict(self.mesh.shape)}'

  def uniform_memory_line(self, param_bytes: int) -> str:
    """Start-up memory line of a strategy whose devices hold only what they use (param_bytes:
    the float32 parameters; the moments as train.mu_dtype says)."""
    state = param_bytes // 4 * self.config.train.state_bytes_per_param
    return (
      'Memory per device (parameters + AdamW moments): '
      f'{state / 1e6:.4g} MB held, all of it used (parameters '
      f'{param_bytes / 1e6:.4g} MB; no dummy slots, every device the same)'
    )

  # -------------------------------------------------------------------------------------------
  # Generation (driven by mas_jax/decode.py; the strategy is built from `decode.decode_config`,
  # whose data.batch_size is the decode batch).
  # -------------------------------------------------------------------------------------------

  def decode_batch_multiple(self) -> int:
    """The decode batch must be a multiple of this (mas_jax.decode pads it)."""
    return 1

  def cache_heads(self) -> int:
    """Size of the KV cache's head axis in this strategy's layout (head slots for ma_sep)."""
    return self.config.model.num_heads

  def cache_spec(self) -> P:
    """PartitionSpec of each KV cache array [L, B, S, heads, H]."""
    return P()

  def cache_shardings(self) -> dict:
    sharding = NamedSharding(self.mesh, self.cache_spec())
    return {'k': sharding, 'v': sharding}

  def init_cache(self, length: int) -> dict:
    """An empty KV cache of `length` positions for the decode batch, in its shardings."""
    batch = self.config.data.batch_size
    return jax.jit(
      lambda: model_lib.init_cache(self.config.model, batch, length, self.cache_heads()),
      out_shardings=self.cache_shardings(),
    )()

  def prepare_decode(self, params: dict, length: int) -> tuple[dict, dict]:
    """(params, cache) that `forward_cached` takes: here the params and an empty KV cache.

    `params` are in this strategy's layout and shardings; a strategy may move some of them
    into the cache (ma_sep's arena).
    """
    return params, self.init_cache(length)

  def decode_memory_rows(self, context: int) -> list[dict]:
    """Generation's memory per device: weights (compute dtype) and KV cache, held vs used.

    Every device of these strategies reads all it holds; ma_sep overrides this per role.
    """
    m = self.config.model
    itemsize = jnp.dtype(m.compute_dtype).itemsize
    params = jax.eval_shape(lambda: self.from_reference(_reference_params(self.config)))
    specs = self.param_specs(params)
    weights = sum(
      local_bytes(self.mesh, spec, leaf.shape, itemsize)
      for spec, leaf in zip(
        jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)),
        jax.tree.leaves(params),
        strict=True,
      )
    )
    shape = (m.num_layers, self.config.data.batch_size, context, self.cache_heads(), m.head_dim)
    cache = 2 * local_bytes(self.mesh, self.cache_spec(), shape, itemsize)
    return [
      decode_memory_row(d, self.name, (weights, weights), (cache, cache))
      for d in range(self.mesh.size)
    ]

  @abc.abstractmethod
  def forward_cached(
    self, params: dict, cache: dict, tokens: jax.Array, start: jax.Array | None
  ) -> tuple[jax.Array, dict]:
    """Prefill (start=None) or decode step (start[B]) of tokens[B, T]: (logits[B, T, V], cache).

    Equal to `model.forward_cached` (dropless) on the reference layout; traced inside jit.
    """

  def check_batch(self, divisor: int, what: str) -> None:
    b = self.config.data.batch_size
    if b % divisor:
      raise ConfigError(f'data.batch_size={b} does not divide over {what}={divisor}')


def local_bytes(mesh: jax.sharding.Mesh, spec: P, shape: tuple[int, ...], itemsize: int) -> int:
  """Bytes of one device's shard of an array of `shape` laid out by `spec` on `mesh`."""
  shards = 1
  for axes in spec:
    for axis in (axes,) if isinstance(axes, str) else axes or ():
      shards *= mesh.shape[axis]
  return math.prod(shape) * itemsize // shards


def decode_memory_row(device: int, role: str, weights: tuple, cache: tuple, arena: int = 0) -> dict:
  """One device's generation memory: (held, used) bytes of weights and of KV cache.

  `arena`: bytes of a buffer that holds some of the used weights or cache (ma_sep's arena);
  it counts once in `held`, and what the role keeps in it is in the used figures.
  """
  held, used = weights[0] + cache[0] + arena, weights[1] + cache[1]
  return {
    'device': device,
    'role': role,
    'weights_held': weights[0],
    'weights_used': weights[1],
    'cache_held': cache[0],
    'cache_used': cache[1],
    'arena_held': arena,
    'held': held,
    'efficiency': used / held,
  }


def decode_memory_table(rows: list[dict]) -> str:
  """Markdown table of `decode_memory_rows`, one line per device (MB)."""
  lines = [
    '| device | role | weights held / used (MB) | KV cache held / used (MB) | arena (MB) '
    '| total held (MB) | used / held |',
    '|---|---|---|---|---|---|---|',
  ]
  gb = lambda x: f'{x / 1e6:.4g}'
  for r in rows:
    lines.append(
      f'| {r["device"]} | {r["role"]} | {gb(r["weights_held"])} / {gb(r["weights_used"])} | '
      f'{gb(r["cache_held"])} / {gb(r["cache_used"])} | {gb(r["arena_held"])} | '
      f'{gb(r["held"])} | {r["efficiency"]:.1%} |'
    )
  return '\n'.join(lines)


def _reference_params(config: Config) -> dict:
  return model_lib.init_params(config)


def finalize(config: Config, ce_sum: jax.Array, stats: dict) -> tuple[jax.Array, dict]:
  """Loss and metrics from global sums (the global batch shape comes from the config)."""
  return model_lib.finalize_loss(
    config.model, ce_sum, stats, config.data.batch_size, config.data.seq_len
  )


def as_varying(tree, axes: tuple[str, ...]):
  """Casts every array leaf to device-varying over axes (needed before a per-device lax.cond)."""
  return jax.tree.map(lambda x: jax.lax.pcast(x, axes, to='varying'), tree)


def zeros_like_tree(tree):
  return jax.tree.map(jnp.zeros_like, tree)
