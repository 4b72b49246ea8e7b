"""Per-device MoE math as pure functions: router, capacity dispatch, experts, combine.

Routing works on groups of tokens: one group is one sequence, x[G, S, D]. Capacity is per
group and expert, `C = ceil(capacity_factor * S * top_k / E)` (or `C = S` when dropless: a token
picks distinct experts, so no expert can receive more than S tokens of one sequence). Because
every strategy shards the batch at sequence granularity, each one makes exactly the reference
model's drop decisions, which is what lets the tests compare them with dropped tokens.

The order in which a full expert drops tokens is the Switch/GShard one: every token's first
choice is placed before any token's second choice, and within a choice earlier tokens first.

Statistics are returned as sums over the groups a caller holds (a strategy psums them over its
data shards and divides by the global counts):
  aux_loss_sum   sum over groups of E * sum_e f_e * P_e  (Switch load-balancing loss; f_e is the
                 fraction of the group's top-k assignments routed to e, P_e its mean gate prob)
  z_loss_sum     sum over tokens of logsumexp(router logits)^2
  dropped        number of (token, choice) assignments over capacity
  expert_counts  [E] assignments routed to each expert (before capacity)

Dims: G groups (sequences), S tokens per group, D d_model, E experts, K top_k, C capacity,
F expert hidden.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mas_jax.layers import grouped_matmul as gmm_lib

# How a device that holds all experts runs them (model.expert_impl; 'auto' is resolved by
# `resolve_expert_impl`): 'einsum' over capacity buffers [G, E, C, D], or one grouped matmul
# over the routed rows sorted by expert ('ragged_dot': XLA's; 'mosaic_gpu': JAX's Hopper kernel).
EXPERT_IMPLS = ('auto', 'einsum', 'ragged_dot', 'mosaic_gpu')
_GROUPED = {'ragged_dot': 'xla', 'mosaic_gpu': 'mosaic_gpu'}


def capacity(
  seq_len: int, top_k: int, num_experts: int, capacity_factor: float, dropless: bool
) -> int:
  """Slots per expert and group; never more than seq_len, which already drops nothing."""
  if dropless:
    return seq_len
  return min(seq_len, math.ceil(capacity_factor * seq_len * top_k / num_experts))


def router(x: jax.Array, w_router: jax.Array, top_k: int) -> dict[str, jax.Array]:
  """Softmax router with top-k selection and renormalised gates.

  Args:
    x: normed tokens [G, S, D] in the compute dtype.
    w_router: [D, E].
    top_k: experts per token.

  Returns:
    logits, probs: [G, S, E] float32; gates: [G, S, K] float32 summing to 1 over K;
    experts: [G, S, K] int32, best first.
  """
  logits = jnp.einsum('GSD,DE->GSE', x, w_router.astype(x.dtype)).astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  top_probs, experts = jax.lax.top_k(probs, top_k)  # [G, S, K]
  gates = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)
  return {'logits': logits, 'probs': probs, 'gates': gates, 'experts': experts}


def routing_stats(route: dict[str, jax.Array], num_experts: int) -> dict[str, jax.Array]:
  """Load-balancing and z-loss sums and expert counts (see the module docstring)."""
  probs, experts = route['probs'], route['experts']
  s, k = experts.shape[1], experts.shape[2]
  counts = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32), axis=(1, 2))  # [G,E]
  f = counts / (s * k)
  p = jnp.mean(probs, axis=1)  # [G, E]
  aux = num_experts * jnp.sum(f * p, axis=-1)  # [G]
  z = jnp.square(jax.nn.logsumexp(route['logits'], axis=-1))  # [G, S]
  return {
    'aux_loss_sum': jnp.sum(aux),
    'z_loss_sum': jnp.sum(z),
    'expert_counts': jnp.sum(counts, axis=0),
  }


def dispatch_positions(experts: jax.Array, num_experts: int) -> jax.Array:
  """Slot of each (token, choice) in its expert's queue; [G, S, K] int32 (>= C means dropped)."""
  g, s, k = experts.shape
  # Choice-major order: all first choices of the group, then all second choices.
  onehot = jax.nn.one_hot(jnp.swapaxes(experts, 1, 2), num_experts, dtype=jnp.int32)  # [G,K,S,E]
  onehot = onehot.reshape(g, k * s, num_experts)
  pos = jnp.cumsum(onehot, axis=1) - 1  # [G, K*S, E]
  pos = jnp.sum(pos * onehot, axis=-1).reshape(g, k, s)
  return jnp.swapaxes(pos, 1, 2)


@jax.custom_vjp
def gather_rows(x: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
  """Rows x[index] of x[N, D] -> [M, D]; an index >= N gives a row of zeros.

  `inverse[N, R]` lists the rows of the result that copy row n (>= M where there are fewer than
  R), so the backward pass is a gather too: dx[n] = sum_r dy[inverse[n, r]]. Autodiff would
  transpose the gather into a scatter-add of whole rows, which runs far slower on a GPU
  (docs/benchmarks/README.md, "Where the train step's time goes").
  """
  return x.at[index].get(mode='fill', fill_value=0)


def _gather_rows_fwd(x, index, inverse):
  return gather_rows(x, index, inverse), (index, inverse)


def _gather_rows_bwd(res, dy):
  index, inverse = res
  dx = dy.at[inverse].get(mode='fill', fill_value=0)  # [N, R, D]
  dx = dx[:, 0] if inverse.shape[1] == 1 else jnp.sum(dx, axis=1, dtype=dy.dtype)
  return dx, None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def slot_maps(
  experts: jax.Array, positions: jax.Array, num_experts: int, cap: int, expert_major: bool = False
) -> tuple[jax.Array, jax.Array]:
  """Where each routed (token, choice) pair goes, and back, as flat row indices.

  Returns slot_of_pair[G * S * K]: the row of the pair's slot in the flattened expert buffers
  (G * E * C rows, ordered [G, E, C], or [E, G, C] when `expert_major`), G * E * C when the pair
  is dropped; and pair_of_slot[G * E * C]: the pair (g * S + s) * K + k in each slot,
  G * S * K where the slot is empty.
  """
  g, s, k = experts.shape
  groups = jnp.arange(g, dtype=jnp.int32)[:, None, None]
  if expert_major:
    slot = (experts * g + groups) * cap + positions
  else:
    slot = (groups * num_experts + experts) * cap + positions
  slots = g * num_experts * cap
  slot_of_pair = jnp.where(positions < cap, slot, slots).reshape(-1)
  pairs = jnp.arange(g * s * k, dtype=jnp.int32)
  pair_of_slot = jnp.full((slots,), g * s * k, jnp.int32).at[slot_of_pair].set(pairs, mode='drop')
  return slot_of_pair, pair_of_slot


def dispatch(
  x: jax.Array,
  experts: jax.Array,
  positions: jax.Array,
  num_experts: int,
  cap: int,
  expert_major: bool = False,
) -> jax.Array:
  """Copies tokens x[G, S, D] into expert buffers [G, E, C, D] ([E, G, C, D] when
  `expert_major`); over-capacity ones vanish, empty slots hold zeros. Both passes are row
  gathers (`gather_rows`)."""
  g, s, k = experts.shape
  d = x.shape[-1]
  slot_of_pair, pair_of_slot = slot_maps(experts, positions, num_experts, cap, expert_major)
  # A slot's token is its pair // K (an empty slot's G * S is past the last token).
  rows = gather_rows(x.reshape(g * s, d), pair_of_slot // k, slot_of_pair.reshape(g * s, k))
  shape = (num_experts, g) if expert_major else (g, num_experts)
  return rows.reshape(*shape, cap, d)


def combine(
  y: jax.Array,
  experts: jax.Array,
  positions: jax.Array,
  gates: jax.Array,
  expert_major: bool = False,
) -> jax.Array:
  """Gathers expert outputs y[G, E, C, D] ([E, G, C, D] when `expert_major`) back to tokens,
  gate-weighted: -> [G, S, D]."""
  g, s, k = experts.shape
  num_experts, cap, d = y.shape[1 - expert_major], y.shape[2], y.shape[3]
  slot_of_pair, pair_of_slot = slot_maps(experts, positions, num_experts, cap, expert_major)
  out = gather_rows(y.reshape(-1, d), slot_of_pair, pair_of_slot[:, None]).reshape(g, s, k, d)
  weight = jnp.where(positions < cap, gates, 0.0).astype(y.dtype)
  return jnp.einsum('GSKD,GSK->GSD', out, weight)


def dropout_keep_mask(
  key: jax.Array, group_ids: jax.Array, expert_ids: jax.Array, shape: tuple[int, int], rate: float
) -> jax.Array:
  """Expert dropout keep-mask [G, E, C, F] that depends only on global (group, expert) ids.

  Each (group, expert) block draws from `fold_in(fold_in(key, group), expert)`, so a strategy
  that holds any subset of groups and experts draws exactly the bits the reference draws.
  """

  def block(g, e):
    return jax.random.bernoulli(
      jax.random.fold_in(jax.random.fold_in(key, g), e), 1.0 - rate, shape
    )

  return jax.vmap(lambda g: jax.vmap(lambda e: block(g, e))(expert_ids))(group_ids)


@jax.tree_util.register_pytree_node_class
class GradSink:
  """A float32 gradient accumulator handed to `sink_matmul` beside the weight it belongs to.

  A pytree of one leaf (`acc`, shaped like the weight) and a static `scale`, so the model's layer
  scan slices it like any other block parameter and a gradient taken with respect to it has its
  structure. train_lib.accumulate puts one in the expert parameters as 'w_in_sink' and
  'w_out_sink' (train.fuse_grad_accum); nothing else creates them.
  """

  def __init__(self, acc: jax.Array, scale: float):
    self.acc, self.scale = acc, scale

  def tree_flatten(self):
    return (self.acc,), self.scale

  @classmethod
  def tree_unflatten(cls, scale, children):
    return cls(children[0], scale)


@jax.custom_vjp
def sink_matmul(x: jax.Array, w: jax.Array, sink: GradSink) -> jax.Array:
  """x[E, M, K] @ w[E, K, N] -> [E, M, N] (x's dtype), the weight gradient sent into `sink`.

  The forward ignores the sink. The backward returns dx as autodiff would, no gradient for w, and
  as the sink's cotangent sink.acc + sink.scale * (x^T dy in float32): differentiated with respect
  to the sink, the accumulator comes back with this matmul's weight gradient added. XLA's GPU
  GEMM rewriter makes that one cuBLASLt matmul with alpha = scale, beta = 1 whose result is the
  next carry of accumulate's scan: no bf16 gradient, no separate read-modify-write (H100, JAX
  0.11.2; bench/grad_accum_fusion.py records the HLO).
  """
  del sink
  return jnp.einsum('EMK,EKN->EMN', x, w)


def _sink_matmul_fwd(x, w, sink):
  return sink_matmul(x, w, sink), (x, w, sink)


def _sink_matmul_bwd(res, dy):
  x, w, sink = res
  dx = jnp.einsum('EMN,EKN->EMK', dy, w)
  dw = jnp.einsum('EMK,EMN->EKN', x, dy, preferred_element_type=jnp.float32)
  return dx, None, GradSink(sink.acc + dw * sink.scale, sink.scale)


sink_matmul.defvjp(_sink_matmul_fwd, _sink_matmul_bwd)


def expert_ffn(
  x: jax.Array,
  w_in: jax.Array,
  w_out: jax.Array,
  activation: str,
  keep_mask: jax.Array | None = None,
  rate: float = 0.0,
  expert_major: bool = False,
  sinks: tuple[GradSink, GradSink] | None = None,
) -> jax.Array:
  """Experts: x[G, E, C, D] -> act(x @ w_in[E, D, F]) (dropout) @ w_out[E, F, D] -> [G, E, C, D].

  With `expert_major`, x and the result are [E, G, C, D] (keep_mask stays [G, E, C, F]): every
  expert's rows are contiguous, so each matmul of both passes is one batched GEMM over E with
  no transposes. With a slice of F (tensor parallelism) the output is a partial sum over F.
  `sinks` (expert-major only): w_in's and w_out's gradients go into them (`sink_matmul`), and
  w_in and w_out get none.
  """
  dtype = x.dtype
  if sinks is not None and not expert_major:
    raise ValueError('gradient sinks need the expert-major layout')
  if expert_major:
    e, g, c, d = x.shape
    rows = x.reshape(e, g * c, d)
    if sinks is not None:
      h = sink_matmul(rows, w_in.astype(dtype), sinks[0])
    else:
      h = jnp.einsum('EMD,EDF->EMF', rows, w_in.astype(dtype))
  else:
    h = jnp.einsum('GECD,EDF->GECF', x, w_in.astype(dtype))
  h = jax.nn.gelu(h, approximate=True) if activation == 'gelu' else jax.nn.relu(h)
  if keep_mask is not None:
    if expert_major:
      keep_mask = jnp.swapaxes(keep_mask, 0, 1).reshape(h.shape)
    h = jnp.where(keep_mask, h / (1.0 - rate), 0.0).astype(dtype)
  if sinks is not None:
    return sink_matmul(h, w_out.astype(dtype), sinks[1]).reshape(x.shape)
  if expert_major:
    return jnp.einsum('EMF,EFD->EMD', h, w_out.astype(dtype)).reshape(x.shape)
  return jnp.einsum('GECF,EFD->GECD', h, w_out.astype(dtype))


def resolve_expert_impl(impl: str, dropless: bool, dropout_rate: float = 0.0) -> str:
  """'auto' -> the implementation measured fastest for the routing (docs/benchmarks/README.md).

  Capacity routing: the batched einsum. Capacity routing on the grouped kernels
  (`model.expert_impl='mosaic_gpu'`) computes only the kept pairs, but its train step on one H100
  was within 0.3% of the einsum's in two calls (+0.2%, -0.3%; docs/benchmarks/session11/), so
  `auto` does not switch. Dropless routing: the
  einsum would compute num_experts / top_k times the useful FLOPs, so a grouped matmul: the
  Mosaic-GPU kernels on a Hopper GPU, XLA's ragged_dot elsewhere. Expert dropout always takes the
  einsum.
  Raises ValueError for 'mosaic_gpu' off a Hopper GPU.
  """
  device = jax.devices()[0]
  hopper = device.platform == 'gpu' and getattr(device, 'compute_capability', '') == '9.0'
  if impl == 'mosaic_gpu' and not hopper:
    raise ValueError(
      f"model.expert_impl='mosaic_gpu' needs a Hopper (sm_90) GPU, not {device.device_kind}"
    )
  if impl != 'auto':
    return impl
  if not dropless or dropout_rate > 0:
    return 'einsum'
  return 'mosaic_gpu' if hopper else 'ragged_dot'


def grouped_expert_ffn(
  x: jax.Array,
  experts: jax.Array,
  weights: jax.Array,
  w_in: jax.Array,
  w_out: jax.Array,
  activation: str,
  impl: str,
  kept: jax.Array | None = None,
) -> jax.Array:
  """Experts on the routed rows sorted by expert: x[G, S, D] -> sum_k weights * expert(x) [G, S, D].

  Every kept (token, choice) pair is one row of a grouped matmul, the rows sorted by expert: no
  capacity padding is computed. A dropped pair (`kept` False: over capacity) is sorted after all
  kept ones, past the groups' total, where the kernels compute nothing (what they leave in those
  rows is never read: the pair's row gathers zeros in both passes). Rows move by `gather_rows`
  both ways, so neither pass scatters.

  Args:
    x: normed tokens [G, S, D].
    experts: [G, S, K] routed experts.
    weights: [G, S, K] gates of the pairs.
    w_in, w_out: [E, D, F] and [E, F, D].
    activation: 'gelu' or 'relu'.
    impl: 'ragged_dot' or 'mosaic_gpu'.
    kept: [G, S, K] bool, the pairs within capacity (None: all, dropless routing).
  """
  g, s, k = experts.shape
  n, d = g * s, x.shape[-1]
  m, num_experts = n * k, w_in.shape[0]
  flat = experts.reshape(-1)  # [G*S*K], token-major
  keep = jnp.ones(flat.shape, bool) if kept is None else kept.reshape(-1)
  key = jnp.where(keep, flat, num_experts)  # dropped pairs sort after every expert
  order = jnp.argsort(key, stable=True)  # sorted row -> pair
  sizes = jnp.bincount(key, length=num_experts + 1)[:num_experts].astype(jnp.int32)
  rank = jnp.zeros(m, jnp.int32).at[order].set(jnp.arange(m, dtype=jnp.int32))  # pair -> row
  kept_rows = keep[order]
  rank = jnp.where(keep, rank, m)  # a dropped pair reads and receives nothing
  token = jnp.where(kept_rows, order // k, n)
  rows = gather_rows(x.reshape(n, d), token, rank.reshape(n, k))  # [G*S*K, D] sorted by expert
  backend = _GROUPED[impl]
  h = gmm_lib.gmm(rows, w_in, sizes, backend)  # kernels and tilings by shape and row count
  h = jax.nn.gelu(h, approximate=True) if activation == 'gelu' else jax.nn.relu(h)
  y = gmm_lib.gmm(h, w_out, sizes, backend)
  # Each pair's row back in token order (zeros for dropped pairs), weighted, summed over K.
  y = gather_rows(y, rank, jnp.where(kept_rows, order, m)[:, None]).reshape(n, k, d)
  y = jnp.sum(y * weights.reshape(n, k, 1).astype(y.dtype), axis=1, dtype=y.dtype)
  return y.reshape(g, s, d)


def moe_ffn(
  x: jax.Array,
  params: dict,
  *,
  top_k: int,
  cap: int,
  activation: str,
  dropout_rate: float = 0.0,
  dropout_key: jax.Array | None = None,
  group_offset: int | jax.Array = 0,
  impl: str = 'einsum',
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The MoE FFN of one device holding all experts: normed x[G, S, D] -> y[G, S, D], stats.

  Args:
    x: normed tokens [G, S, D] in the compute dtype.
    params: {'router': [D, E], 'w_in': [E, D, F], 'w_out': [E, F, D]}, and with
      train.fuse_grad_accum the GradSinks 'w_in_sink' and 'w_out_sink' ('einsum' only).
    top_k, cap, activation: routing and expert settings.
    dropout_rate, dropout_key: expert dropout (off when the key is None or the rate is 0;
      'einsum' only).
    group_offset: global index of this caller's first group (for the dropout mask).
    impl: one of EXPERT_IMPLS other than 'auto'. Every one makes the same routing and drop
      decisions; they differ only in how the expert matmuls run.
  """
  num_experts = params['router'].shape[-1]
  with jax.named_scope('route'):
    route = router(x, params['router'], top_k)
    stats = routing_stats(route, num_experts)
    pos = dispatch_positions(route['experts'], num_experts)
    stats['dropped'] = jnp.sum((pos >= cap).astype(jnp.float32))
  sinks = params.get('w_in_sink'), params.get('w_out_sink')
  sinks = None if sinks[0] is None else sinks
  if impl != 'einsum':
    if dropout_key is not None and dropout_rate > 0:
      raise ValueError(f'expert dropout needs the einsum experts, not impl={impl!r}')
    if sinks is not None:
      raise ValueError(f'gradient sinks need the einsum experts, not impl={impl!r}')
    with jax.named_scope('experts'):
      y = grouped_expert_ffn(
        x,
        route['experts'],
        route['gates'],
        params['w_in'],
        params['w_out'],
        activation,
        impl,
        kept=None if cap >= x.shape[1] else pos < cap,
      )
    return y, stats
  # Expert-major buffers [E, G, C, D]: each expert's matmuls are one batched GEMM.
  with jax.named_scope('dispatch'):
    xe = dispatch(x, route['experts'], pos, num_experts, cap, expert_major=True)
  with jax.named_scope('experts'):
    mask = None
    if dropout_key is not None and dropout_rate > 0:
      groups = group_offset + jnp.arange(x.shape[0])
      mask = dropout_keep_mask(
        dropout_key, groups, jnp.arange(num_experts), (cap, params['w_in'].shape[-1]), dropout_rate
      )
    ye = expert_ffn(
      xe,
      params['w_in'],
      params['w_out'],
      activation,
      mask,
      dropout_rate,
      expert_major=True,
      sinks=sinks,
    )
  with jax.named_scope('combine'):
    y = combine(ye, route['experts'], pos, route['gates'], expert_major=True)
  return y, stats
