"""Top-K gradient compression with error feedback for the replicated parameters' all-reduce.

`parallel.grad_compression='topk'`: a parameter every device holds whole (PartitionSpec `P()`)
normally enters a strategy's `jax.shard_map` invariant, and the transpose of its implicit cast to
device-varying is a psum of its gradient over the mesh: 8 bytes per parameter per device on a
ring. Here it enters through `sync`, a cast whose transpose instead

  1. adds the device's residual (what it did not send before) to its local gradient g;
  2. keeps the k = ceil(topk_fraction x size) entries of largest magnitude;
  3. all_gathers their (int32 index, value) pairs over the mesh and scatter-adds them into one
     dense gradient, the same on every device: 8 k bytes sent, 8 k n received;
  4. keeps g minus what it sent as the new residual (error feedback).

The new residual leaves the backward pass as the cotangent of the residual input (as flax's fp8
layers return their new scales): `Strategy.value_and_grad` returns it beside the gradients, and
the train step stores it. Each device's residual is its own: the state holds [n, *shape] per
compressed parameter, sharded over all devices (one float32 copy of the replicated parameters on
each device). With gradient accumulation every chunk's all-reduce is compressed, and the residual
is carried from chunk to chunk.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P


def residual_specs(residual, axes: tuple[str, ...]):
  """PartitionSpec of a residual tree: the leading device axis over every mesh axis."""
  return jax.tree.map(lambda _: P(axes), residual)


def topk_allreduce(g: jax.Array, residual: jax.Array, k: int, axes: tuple[str, ...]):
  """(sum over `axes` of each device's top-k of g + residual, the new residual).

  g and residual are device-varying and flat; the sum is invariant over `axes`."""
  full = g.astype(jnp.float32) + residual
  _, idx = lax.top_k(jnp.abs(full), k)
  values = full[idx]
  # [n k]: every device's indices and values, the same on every device (invariant over axes).
  all_idx = lax.all_gather(idx, axes, tiled=True, to='invarying')
  all_values = lax.all_gather(values, axes, tiled=True, to='invarying')
  total = jnp.zeros(full.shape, jnp.float32).at[all_idx].add(all_values)
  return total, full.at[idx].set(0.0)


def _sync_leaf(x: jax.Array, residual: jax.Array, fraction: float, axes: tuple[str, ...]):
  k = max(1, math.ceil(fraction * x.size))

  @jax.custom_vjp
  def cast(x, residual):
    return lax.pcast(x, axes, to='varying')

  def fwd(x, residual):
    return cast(x, residual), residual

  def bwd(residual, ct):
    total, new = topk_allreduce(ct.reshape(-1), residual.reshape(-1), k, axes)
    return total.reshape(x.shape).astype(ct.dtype), new.reshape(residual.shape)

  cast.defvjp(fwd, bwd)
  return cast(x, residual)


def sync(params, specs, residual, fraction: float, axes: tuple[str, ...]):
  """Inside a shard_map over `axes`: params with every `P()` leaf cast to device-varying
  through the compressed all-reduce of its gradient (see the module docstring); `residual` is
  this device's [1, *shape] slice of each compressed leaf's residual."""
  return jax.tree.map(
    lambda x, s, r: _sync_leaf(x, r[0], fraction, axes) if s == P() else x,
    params,
    specs,
    residual,
    is_leaf=lambda x: isinstance(x, P) or x is None,
  )
