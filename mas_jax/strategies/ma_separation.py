"""`ma_sep`: MA Separation, attention on `attn_devices` devices and experts on `moe_devices`.

One jitted SPMD program: `jax.shard_map` over the role mesh of `mas_jax.mesh`, where each device
runs only its role's work, chosen per device with `lax.switch` on its row (a real HLO
conditional: the other role's computation is not executed, forward or backward).

Per layer and micro-batch (the seed's Stage 1-3, then the MoE):
  Stage 1  every attention device holds the layer input x[b, T, D] of the micro-batch and
           projects its own head slots (heads [i*N/A, (i+1)*N/A), padded slots masked).
  Stage 2  causal attention of those heads.
  Stage 3  output projection: a partial sum over heads, out[b,T,D]{U_heads}. One `psum` over
           the whole mesh (expert devices add zeros) is the seed's 12 -> 1 all-reduce and the
           broadcast to the expert devices at once; `hierarchical_allreduce` reduces inside a
           row first, then across rows.
  MoE      `moe_dispatch='all_to_all'` (the default where the expert devices form one mesh
           row): expert device c takes its 1/n_moe of the micro-batch's sequences, routes them
           (router, top-k, capacity or dropless), sends each expert's capacity buffer to the
           device holding that expert with `all_to_all` inside the expert row, runs its experts,
           returns the outputs with a second `all_to_all`, combines, and all_gathers the row's
           sequences; `ppermute`s then carry the result to every attention row.
           `moe_dispatch='replicated'` (any split, e.g. 4:12 whose expert devices span rows):
           every expert device routes every token (the broadcast already put them there),
           computes its own experts' part, and the mesh-wide psum that also carries the
           attention output adds the parts and returns them.

Data-parallel attention (`parallel.attn_sharding='batch'`, MegaScale-Infer's placement): every
attention device holds all heads of every layer (the attention weights are replicated on every
device, like the router) and runs its floor/ceil share of each micro-batch's sequences,
sequences [i*b/A, (i+1)*b/A) padded to ceil(b/A) slots (`RoleLayout.sequences_of`). Stage 3 is
then a whole output, not a partial sum: the tick's exchange all_gathers every device's
[slots, T, D] over the mesh (expert devices send zeros) and takes the real rows in sequence
order, instead of the psum (the backward reduce-scatters). The attention weights' gradients are
all-reduced with the other replicated parameters' (compressed under grad_compression='topk').
No head is padding (the seed's 32 heads on 12 devices pad 4 slots); sequences are, where b does
not divide over A. In generation each attention device caches all heads of its own sequences.

Co-execution: with M >= 2 micro-batches the schedule is a software pipeline of "ticks"; in one
tick the attention devices run layer l of micro-batch m while the expert devices run the MoE of
the previous item, then both exchange in the tick's collectives (the seed's barrier: the
collectives are where the two groups meet). All collectives that span both groups run outside
the per-role branch; inside it only the expert row's all_to_all/all_gather. The tick
table is static (see `schedule`) and logged with each role's busy and idle ticks.

Placement of the rest, and why:
  - Embedding (replicated) is looked up on every device: a gather, cheaper than sending x.
  - The residual stream x and post-attention h of every micro-batch live on every device: the
    psums leave them replicated, so each role reads its input without another transfer.
  - Norms run where their output is consumed: attn_norm on attention devices, mlp_norm on
    expert devices; the final norm with the head.
  - The output head and the loss are split by tokens over all devices (each takes B*T/n tokens),
    so no role idles through the largest matmul of a small model; cross-entropy sums are psum-ed.
  - Parameters: attention weights are held in head slots sharded over all devices and experts
    in expert slots sharded over all devices; attention devices hold zero dummy expert slots and
    expert devices zero dummy head slots (one SPMD program: every device holds same-shaped
    buffers). The router, norms, embedding and head are replicated. `from_reference` and
    `to_reference` convert to and from the reference layout. Optimizer state follows the
    parameters. Dummy slots get zero gradients and stay zero under AdamW.

Load balancing: expert load fractions and the aux/z losses are computed every step (with
replicated dispatch they are identical on every expert device, so their sums are divided by
moe_devices). The head assignment is computed from the config (heads cost the same: balance
comes from the split). Experts are re-placed dynamically with parallel.rebalance_every
(mas_jax/rebalance.py): an expert -> slot table, a traced input of the step, routes expert e to
slot table[e] (`_slots`; dropout is drawn by expert id, so the math is the reference's), and
`move_experts` moves the weights and moments between the expert devices when it changes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax
from jax.sharding import PartitionSpec as P

from mas_jax import mesh as mesh_lib
from mas_jax import model as model_lib
from mas_jax.config import ConfigError
from mas_jax.layers import attention as attn_lib
from mas_jax.layers import moe as moe_lib
from mas_jax.mesh import ALL_AXES, ATTN_AXIS, EXPERT_AXIS
from mas_jax.strategies import base

_SLOTTED = P(None, ALL_AXES)  # [L, slots, ...] sharded over every device


@dataclasses.dataclass(frozen=True)
class Tick:
  """One step of the co-execution schedule: (layer, micro-batch) per role, or None if idle."""

  attn: tuple[int, int] | None
  moe: tuple[int, int] | None


def schedule(num_layers: int, num_microbatches: int) -> list[Tick]:
  """Greedy ping-pong: each role takes its next item as soon as its input exists.

  Attention of (l, m) needs the MoE of (l - 1, m) finished in an earlier tick; the MoE of
  (l, m) needs the attention of (l, m). With M >= 2 the roles overlap in every tick but the
  first and last; with M = 1 they alternate.
  """
  items = [(layer, m) for layer in range(num_layers) for m in range(num_microbatches)]
  attn_done, moe_done = {}, {}
  ai = ei = 0
  ticks: list[Tick] = []
  while ei < len(items):
    t = len(ticks)
    a = e = None
    if ai < len(items):
      layer, m = items[ai]
      if layer == 0 or moe_done.get((layer - 1, m), t) < t:
        a = items[ai]
    if attn_done.get(items[ei], t) < t:
      e = items[ei]
    if a is not None:
      attn_done[a], ai = t, ai + 1
    if e is not None:
      moe_done[e], ei = t, ei + 1
    ticks.append(Tick(a, e))
  return ticks


def schedule_picture(ticks: list[Tick]) -> str:
  """Two text rows, one per role: 'l.m' in a busy tick, '--' in an idle one."""
  fmt = lambda item: f'{item[0]}.{item[1]}' if item else ' --'
  attn = ' '.join(f'{fmt(t.attn):>4}' for t in ticks)
  moe = ' '.join(f'{fmt(t.moe):>4}' for t in ticks)
  return f'  attention | {attn}\n  experts   | {moe}'


def _to_varying(tree):
  """Casts every leaf to device-varying over the whole mesh, where it is not already.

  Every operand of the per-device switch must be varying: an invariant value used inside a
  branch would get an implicit cast there whose transpose, a psum inside the backward branch,
  spans devices that do not take it and deadlocks.
  """

  def cast(x):
    aval = jax.typeof(x)
    have = aval.manual_axis_type.varying if hasattr(aval, 'manual_axis_type') else aval.vma
    missing = tuple(a for a in ALL_AXES if a not in have)
    return lax.pcast(x, missing, to='varying') if missing else x

  return jax.tree.map(cast, tree)


@jax.custom_vjp
def _sink(w):
  """Zeros shaped like w whose cotangent becomes w's: the start of a layer's gradient chain."""
  return jnp.zeros_like(w)


_sink.defvjp(lambda w: (jnp.zeros_like(w), None), lambda _, ct: (ct,))


def _sink_weights(per_layer):
  """(per-layer weights, per-layer sinks) for `MASeparation._run_ticks(grads=...)`."""
  return per_layer, [_to_varying(jax.tree.map(_sink, w)) for w in per_layer]


def _switch_into_sinks(index, branches, operands, weights, sinks):
  """`lax.switch(index, branches, *operands, weights)` whose weight gradients go into `sinks`.

  Returns (the switch's outputs, sinks). A layer's weights are read by 2M ticks (attention and
  MoE of each micro-batch); differentiated as a plain switch, each tick would cost two
  weight-sized buffers that live until the end of the backward pass:
    - JAX saves a conditional's residuals as the union of its branches' residuals, zero-filled
      where a branch has none, so a tick whose experts branch reads the weights outputs a copy
      of them for the backward (the attention and idle branches output zeros);
    - the tick's backward conditional returns its own weight cotangent, and XLA fuses the sum
      of a layer's 2M cotangents into one loop after the last of them.
  Here the residuals are the operands and weights themselves (no copies; the backward
  recomputes the branch, as `model.remat='full'` would), and the backward conditional adds the
  branch's weight cotangents into the sinks' cotangents inside the branch: one running buffer
  per layer, passed from tick to tick. `weights` get no cotangent of their own; `_sink` hands
  the accumulated one to them.
  """

  @jax.custom_vjp
  def run(index, operands, weights, sinks):
    return lax.switch(index, branches, *operands, weights), sinks

  def fwd(index, operands, weights, sinks):
    return run(index, operands, weights, sinks), (index, operands, weights)

  def bwd(res, cts):
    index, operands, weights = res
    ct_out, ct_sinks = cts

    def transposed(branch):
      def run_backward(operands, weights, ct_out, ct_sinks):
        _, vjp = jax.vjp(lambda o, w: branch(*o, w), operands, weights)
        ct_operands, ct_weights = vjp(ct_out)
        return ct_operands, jax.tree.map(jnp.add, ct_sinks, ct_weights)

      return run_backward

    ct_operands, ct_sinks = lax.switch(
      index, [transposed(b) for b in branches], operands, weights, ct_out, ct_sinks
    )
    return None, ct_operands, None, ct_sinks

  run.defvjp(fwd, bwd)
  return run(index, operands, weights, sinks)


def _get(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


class MASeparation(base.Strategy):
  """Attention on the first `attn_devices` devices, experts on the remaining `moe_devices`."""

  name = 'ma_sep'

  def __init__(self, config, devices=None):
    super().__init__(config, devices)
    m, p, d = config.model, config.parallel, config.data
    n = len(self.devices)
    if p.attn_devices < 1 or p.moe_devices < 1:
      raise ConfigError(
        f'parallel.attn_devices={p.attn_devices} and parallel.moe_devices='
        f'{p.moe_devices} must both be >= 1'
      )
    if p.attn_devices + p.moe_devices != n:
      raise ConfigError(
        f'parallel.attn_devices={p.attn_devices} + parallel.moe_devices='
        f'{p.moe_devices} != device count {n}'
      )
    if m.num_experts % p.moe_devices:
      raise ConfigError(
        f'model.num_experts={m.num_experts} does not divide over '
        f'parallel.moe_devices={p.moe_devices}'
      )
    if (d.batch_size * d.seq_len) % n:
      raise ConfigError(
        f'data.batch_size * data.seq_len = {d.batch_size * d.seq_len} tokens do '
        f'not divide over {n} devices (the output head splits tokens)'
      )
    self.layout = mesh_lib.RoleLayout(p.attn_devices, p.moe_devices, m.num_heads, m.num_experts)
    self.batch_attn = p.attn_sharding == 'batch'
    micro = d.batch_size // p.num_microbatches
    if self.batch_attn and micro < p.attn_devices:
      logging.warning(
        'parallel.attn_sharding=batch: %d sequences per micro-batch on %d attention devices: '
        'devices %s hold no sequence and only run padding.',
        micro,
        p.attn_devices,
        [i for i in range(p.attn_devices) if not self.layout.sequences_of(i, micro)],
      )
    if p.attn_devices > m.num_heads and not self.batch_attn:
      idle = [i for i in range(p.attn_devices) if not self.layout.heads_of(i)]
      logging.warning(
        'parallel.attn_devices=%d > model.num_heads=%d: attention devices %s hold '
        'no real head and only run padding.',
        p.attn_devices,
        m.num_heads,
        idle,
      )
    self._mesh = mesh_lib.make_mesh(self.layout, self.devices)
    self.ticks = schedule(m.num_layers, p.num_microbatches)
    self.dispatch = self._resolve_dispatch()

  def _resolve_dispatch(self) -> str:
    """'all_to_all' needs every expert device in one mesh row and whole sequences per device."""
    p, lay = self.config.parallel, self.layout
    micro = self.config.data.batch_size // p.num_microbatches
    one_row = lay.shape[0] - lay.attn_rows == 1
    fits = one_row and micro % lay.n_moe == 0
    if p.moe_dispatch == 'all_to_all' and not one_row:
      raise ConfigError(
        f'parallel.moe_dispatch=all_to_all needs the {lay.n_moe} expert devices in one mesh row '
        f'(moe_devices={lay.n_moe} must divide attn_devices={lay.n_attn}); use replicated'
      )
    if p.moe_dispatch == 'all_to_all' and not fits:
      raise ConfigError(
        f'parallel.moe_dispatch=all_to_all: {micro} sequences per micro-batch do not divide '
        f'over moe_devices={lay.n_moe}'
      )
    if p.moe_dispatch == 'auto':
      return 'all_to_all' if fits else 'replicated'
    return p.moe_dispatch

  @property
  def mesh(self):
    return self._mesh

  @property
  def _micro_batch(self) -> int:
    """Sequences per micro-batch (training and generation alike)."""
    return self.config.data.batch_size // self.config.parallel.num_microbatches

  # -------------------------------------------------------------------------------------------
  # Parameter layout.
  # -------------------------------------------------------------------------------------------

  def param_specs(self, params):
    specs = jax.tree.map(lambda _: P(), params)
    attn, moe = specs['blocks']['attn'], specs['blocks']['moe']
    if not self.batch_attn:  # attn_sharding='batch': every device holds every head (P())
      for name in ('wq', 'wk', 'wv'):
        attn[name] = P(None, None, ALL_AXES)  # [L, D, slots, H]
      attn['wo'] = _SLOTTED  # [L, slots, H, D]
    for name in ('w_in', 'w_out'):  # [L, expert slots, ...]; in the arena during generation
      if name in moe:
        moe[name] = _SLOTTED
    return specs

  def from_reference(self, params, placement=None):
    """Reference layout -> head and expert slots (dummy slots zero). `placement` ([E] int32,
    the expert slot of each expert; None: expert e in slot e) is the re-placement table of
    parallel.rebalance_every (traceable)."""
    lay = self.layout
    slots = lay.slot_heads()
    real = jnp.asarray(slots >= 0)
    idx = jnp.asarray(np.maximum(slots, 0))
    out = jax.tree.map(lambda x: x, params)
    attn = out['blocks']['attn']
    if not self.batch_attn:
      for name in ('wq', 'wk', 'wv'):
        attn[name] = jnp.take(attn[name], idx, axis=2) * real[None, None, :, None]
      attn['wo'] = jnp.take(attn['wo'], idx, axis=1) * real[None, :, None, None]
    moe = out['blocks']['moe']
    dummy = lay.n_attn * lay.local_experts
    for name in ('w_in', 'w_out'):
      w = moe[name]
      if placement is not None:  # slot s holds the expert whose placement is s
        w = jnp.take(w, jnp.argsort(placement), axis=1)
      moe[name] = jnp.concatenate([jnp.zeros((w.shape[0], dummy, *w.shape[2:]), w.dtype), w], 1)
    return out

  def to_reference(self, params, placement=None):
    """Head and expert slots -> reference layout (the inverse of `from_reference`)."""
    lay = self.layout
    slots = lay.slot_heads()
    inv = np.zeros(lay.num_heads, np.int32)
    inv[slots[slots >= 0]] = np.nonzero(slots >= 0)[0]
    out = jax.tree.map(lambda x: x, params)
    attn = out['blocks']['attn']
    if not self.batch_attn:
      for name in ('wq', 'wk', 'wv'):
        attn[name] = jnp.take(attn[name], jnp.asarray(inv), axis=2)
      attn['wo'] = jnp.take(attn['wo'], jnp.asarray(inv), axis=1)
    moe = out['blocks']['moe']
    for name in ('w_in', 'w_out'):
      moe[name] = moe[name][:, lay.n_attn * lay.local_experts :]
      if placement is not None:
        moe[name] = jnp.take(moe[name], placement, axis=1)
    return out

  def move_experts(self, tree, old, new):
    """A parameter-shaped tree (parameters, or an AdamW moment) in this layout with its experts
    moved from the slots of table `old` to those of `new` ([E] int32 expert -> slot tables,
    traced; parallel.rebalance_every).

    F - 1 rounds of `ppermute` between the expert devices (round r: expert device j sends
    device (j + r) % F the experts it holds that the new table puts there, in their new slots,
    zeros elsewhere), so each device sends and receives at most its own E_loc slots per round
    and holds one such buffer at a time: no device ever holds more than its own share, as a
    gather of the slot axis would.
    """
    lay = self.layout
    local, n_moe, n_attn = lay.local_experts, lay.n_moe, lay.n_attn

    def program(w, old, new):  # w: this device's slots [L, E_loc, ...]
      device = mesh_lib.device_index()
      j = device - n_attn  # expert device index (negative on attention devices)
      expert_at = jnp.argsort(new)  # [E] the expert of each new slot
      old_device = old // local  # [E]
      mask = lambda m: m.reshape(1, local, *(1,) * (w.ndim - 2)).astype(w.dtype)  # noqa: E731
      out = jnp.zeros_like(w)
      for r in range(n_moe):
        # The experts of device (j + r)'s new slots that this device holds, from its old slots.
        want = expert_at[((j + r) % n_moe) * local + jnp.arange(local)]
        held = old_device[want] == j
        send = jnp.take(w, jnp.clip(old[want] - j * local, 0, local - 1), axis=1) * mask(held)
        if r:
          pairs = [(n_attn + i, n_attn + (i + r) % n_moe) for i in range(n_moe)]
          send = lax.ppermute(send, ALL_AXES, pairs)
        out = out + send
      return jnp.where(device >= n_attn, out, w)  # attention devices: dummy slots, unchanged

    move = jax.shard_map(program, mesh=self.mesh, in_specs=(_SLOTTED, P(), P()), out_specs=_SLOTTED)
    out = jax.tree.map(lambda x: x, tree)
    moe = out['blocks']['moe']
    for name in ('w_in', 'w_out'):
      moe[name] = move(moe[name], old, new)
    return out

  def batch_spec(self):
    return P()

  def describe(self):
    lay, p = self.layout, self.config.parallel
    busy_a = sum(t.attn is not None for t in self.ticks)
    busy_e = sum(t.moe is not None for t in self.ticks)
    n = len(self.ticks)
    if self.batch_attn:
      micro = self.config.data.batch_size // p.num_microbatches
      slots = lay.seq_slots(micro)
      pad = slots * lay.n_attn - micro
      attention = (
        f'attn_sharding=batch: all {lay.num_heads} heads on {slots} sequence slots per '
        f'attention device and micro-batch ({pad} padding slots, '
        f'{pad / (slots * lay.n_attn):.0%} of attention compute wasted); '
      )
    else:
      pad = lay.head_slots * lay.n_attn - lay.num_heads
      attention = (
        f'{lay.head_slots} head slots per attention device ({pad} padding slots, '
        f'{pad / (lay.head_slots * lay.n_attn):.0%} of attention compute wasted); '
      )
    return '\n'.join(
      [
        f'strategy=ma_sep {lay.n_attn}:{lay.n_moe} mesh={dict(self.mesh.shape)} '
        f'({lay.attn_rows} attention rows, {lay.shape[0] - lay.attn_rows} expert rows); '
        + attention
        + f'{lay.local_experts} experts per expert device; moe_dispatch={self.dispatch}; '
        f'hierarchical_allreduce='
        f'{p.hierarchical_allreduce}',
        lay.placement_table(self._micro_batch if self.batch_attn else None),
        f'Schedule: M={p.num_microbatches} micro-batches, {n} ticks per step; attention busy '
        f'{busy_a}/{n} (idle {n - busy_a}), experts busy {busy_e}/{n} (idle {n - busy_e}); '
        'item = layer.micro-batch:',
        schedule_picture(self.ticks),
        self._memory_summary(),
      ]
    )

  def _memory_summary(self) -> str:
    rows = self.memory_rows()
    line = 'Memory per device (parameters + AdamW moments): {} MB held; used by role:'.format(
      f'{rows[0]["state_held"] / 1e6:.4g}'
    )
    for role in ('attention', 'expert'):
      eff = [r['efficiency'] for r in rows if r['role'] == role]
      line += f' {role} efficiency {min(eff):.1%}-{max(eff):.1%};'
    return line

  def _param_bytes(self, itemsize: int | None = None, experts: bool = True) -> list[tuple]:
    """(held, used) parameter bytes of every device; `itemsize` overrides float32's 4 bytes,
    `experts=False` leaves w_in and w_out out.

    Held counts every local buffer (dummy slots included); used counts what the role reads:
    attention devices their real head slots, expert devices their experts and the router, both
    the embedding, the output head and their own norm.
    """
    lay = self.layout
    abstract = jax.eval_shape(lambda: self.from_reference(base._reference_params(self.config)))
    specs = self.param_specs(abstract)
    counts = lay.head_counts()
    out = []
    for device in range(lay.n_devices):
      is_attn = device < lay.n_attn
      held = used = 0
      for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        name = jax.tree_util.keystr(path)
        if not experts and ('w_in' in name or 'w_out' in name):
          continue
        spec = _get(specs, path)
        size = itemsize or leaf.dtype.itemsize
        local = leaf.size * size // (lay.n_devices if spec != P() else 1)
        held += local
        if "'attn'" in name:
          share = 1 if self.batch_attn else int(counts[device]) / lay.head_slots
          used += int(local * share) if is_attn else 0
        elif 'w_in' in name or 'w_out' in name or 'router' in name or 'mlp_norm' in name:
          used += 0 if is_attn else local
        elif 'attn_norm' in name:
          used += local if is_attn else 0
        else:  # embedding, final norm, output head: every device
          used += local
      out.append((held, used))
    return out

  def memory_rows(self, activation_bytes: int | None = None) -> list[dict]:
    """Bytes per device: parameters and AdamW moments held vs used by the device's role.

    `activation_bytes` (the compiled step's temporary buffers, the same program on every
    device) is reported beside them.
    """
    rows = []
    # State = float32 parameters + AdamW's two moments (the first in train.mu_dtype), sharded
    # alike: train.state_bytes_per_param bytes per float32 parameter's 4.
    state = self.config.train.state_bytes_per_param / 4
    for device, (held, used) in enumerate(self._param_bytes()):
      rows.append(
        {
          'device': device,
          'role': 'attention' if device < self.layout.n_attn else 'expert',
          'state_held': int(state * held),
          'state_used': int(state * used),
          'efficiency': used / held,
          'activations': activation_bytes,
        }
      )
    return rows

  def decode_memory_rows(self, context):
    """Generation's memory per device by role: weights (compute dtype), KV cache and the arena.

    Expert weights and the KV cache share each device's arena (`arena_layout`), so neither
    role holds the other's buffer; outside it every device holds the head slots (dummy on
    expert devices; every head with attn_sharding='batch'), norms, router, embedding and head.
    The KV cache used is that of the device's real heads, or its real sequences.
    """
    lay, m = self.layout, self.config.model
    itemsize = jnp.dtype(m.compute_dtype).itemsize
    at = self.arena_layout(context)
    arena = at['rows'] * m.head_dim * itemsize
    experts = 2 * at['expert_rows'] * m.head_dim * itemsize
    per_entry = 2 * m.num_layers * context * m.head_dim * itemsize  # one sequence, one head
    if self.batch_attn:
      real = (lay.slot_sequences(self._micro_batch) >= 0).sum(axis=1)
      counts = real * self.config.parallel.num_microbatches * m.num_heads
    else:
      counts = lay.head_counts() * self.config.data.batch_size
    rows = []
    for device, (held, used) in enumerate(self._param_bytes(itemsize, experts=False)):
      is_attn = device < lay.n_attn
      rows.append(
        base.decode_memory_row(
          device,
          'attention' if is_attn else 'expert',
          (held, used if is_attn else used + experts),
          (0, per_entry * int(counts[device])),
          arena,
        )
      )
    return rows

  # -------------------------------------------------------------------------------------------
  # The program.
  # -------------------------------------------------------------------------------------------

  def _exchange(self, attn, moe):
    """Delivers both roles' outputs of a tick to every device: (attn[b,T,D], moe[b,T,D]).

    attn: with attn_sharding='heads' partial sums over heads [b,T,D] (expert devices add zeros):
    one psum over the mesh, the seed's 12 -> 1 all-reduce and broadcast to the expert devices in
    one collective, or hierarchical (inside each row, then across rows). With 'batch' each
    attention device's whole outputs of its sequence slots [s,T,D]: one all_gather over the
    mesh (`_gather_attention`). moe: with 'replicated' dispatch a partial sum over experts,
    psum-ed likewise (in the heads psum: one collective of [2,b,T,D]); with 'all_to_all'
    dispatch the full output already sits on every expert device and `ppermute`s carry it to
    the attention rows.
    """
    hier = self.config.parallel.hierarchical_allreduce

    def psum(x):
      return lax.psum(lax.psum(x, EXPERT_AXIS), ATTN_AXIS) if hier else lax.psum(x, ALL_AXES)

    if self.batch_attn:
      attn = self._gather_attention(attn)
    if self.dispatch == 'replicated':
      if self.batch_attn:
        return attn, psum(moe)  # moe[b,T,D]{U_attn,U_expert} -> moe[b,T,D]
      out = psum(jnp.stack([attn, moe]))  # [2,b,T,D]{U_attn,U_expert} -> [2,b,T,D]
      return out[0], out[1]
    if not self.batch_attn:
      attn = psum(attn)  # attn[b,T,D]{U_attn,U_expert} -> attn[b,T,D]
    expert_row = self.layout.attn_rows
    out = moe
    for row in range(expert_row):
      # y[b,T,D] on the expert row -> the same column of attention row `row` (zeros elsewhere).
      out = out + lax.ppermute(moe, ATTN_AXIS, [(expert_row, row)])
    return attn, out

  def _sequence_slots(self, device, batch: int):
    """[seq_slots] the micro-batch sequences this device runs under attn_sharding='batch'
    (padding slots repeat sequence 0; nothing reads their outputs)."""
    table = np.maximum(self.layout.slot_sequences(batch), 0)
    return jnp.asarray(table)[device]

  def _gather_attention(self, out):
    """out[s,T,D] of every device's sequence slots -> attn[b,T,D] on every device: one
    all_gather over the mesh (expert devices' slots are zeros, and never read), then the real
    slots in sequence order."""
    slots = out.shape[0]
    table = self.layout.slot_sequences(self._micro_batch)
    rows = np.zeros(self._micro_batch, np.int32)
    for device, seqs in enumerate(table):
      for j, seq in enumerate(seqs):
        if seq >= 0:
          rows[seq] = device * slots + j
    every = lax.all_gather(out, ALL_AXES, axis=0, tiled=True)  # [n * s, T, D]
    return jnp.take(every, jnp.asarray(rows), axis=0)

  def _attention_part(self, p, x, device):
    """Stages 1-3 of x[b,T,D]: on this attention device's head slots, out[b,T,D]{U_heads}; with
    attn_sharding='batch' all heads of its sequence slots, out[s,T,D]."""
    cfg = self.config.model
    mask = self._head_mask(device)
    if self.batch_attn:
      x, mask = jnp.take(x, self._sequence_slots(device, x.shape[0]), axis=0), None
    h = attn_lib.rms_norm(x, p['attn_norm']['scale'])
    with jax.named_scope('attention'):
      return attn_lib.attention(
        h, p['attn'], jnp.arange(x.shape[1]), cfg.rope_base, mask, cfg.attention_implementation
      )

  def _route(self, p, h):
    """Norm and routing of h[g, T, D]: (normed x, route, stats, slots, capacity)."""
    cfg = self.config.model
    x = attn_lib.rms_norm(h, p['mlp_norm']['scale'])
    cap = moe_lib.capacity(
      x.shape[1], cfg.top_k, cfg.num_experts, cfg.capacity_factor, cfg.dropless
    )
    with jax.named_scope('route'):
      route = moe_lib.router(x, p['moe']['router'], cfg.top_k)
      stats = moe_lib.routing_stats(route, cfg.num_experts)
      pos = moe_lib.dispatch_positions(route['experts'], cfg.num_experts)
      stats['dropped'] = jnp.sum((pos >= cap).astype(jnp.float32))
    return x, route, stats, pos, cap

  def _experts(self, p, xe, key, groups, experts):
    """This device's experts on their buffers xe[G, E_loc, C, D] (global group ids `groups`,
    expert ids `experts` [E_loc])."""
    cfg = self.config.model
    with jax.named_scope('experts'):
      mask = None
      if key is not None and cfg.expert_dropout > 0:
        mask = moe_lib.dropout_keep_mask(
          key,
          groups,
          experts,
          (xe.shape[2], cfg.expert_hidden),
          cfg.expert_dropout,
        )
      return moe_lib.expert_ffn(
        xe, p['moe']['w_in'], p['moe']['w_out'], cfg.activation, mask, cfg.expert_dropout
      )

  def _slots(self, experts, placement, device):
    """(expert slot of each routed expert id, expert ids of this device's slots [E_loc]).

    `placement` [E] is parallel.rebalance_every's table (None: expert e in slot e); a slot's
    queue is its expert's, so capacity positions and drops are the reference's.
    """
    lay = self.layout
    first = (device - lay.n_attn) * lay.local_experts
    mine = first + jnp.arange(lay.local_experts)
    if placement is None:
      return experts, mine
    return placement[experts], jnp.argsort(placement)[mine]

  def _moe_part(self, p, h, key, device, group_offset, placement=None):
    """Routing of all tokens, this device's experts only: h[b,T,D] -> y[b,T,D]{U_experts}."""
    lay = self.layout
    first = (device - lay.n_attn) * lay.local_experts
    x, route, stats, pos, cap = self._route(p, h)
    slots, ids = self._slots(route['experts'], placement, device)
    local = slots - first  # [b, T, K]
    mine = (local >= 0) & (local < lay.local_experts)
    # Tokens of other devices' experts get slot `cap`: dropped here, computed there.
    pos_local = jnp.where(mine, pos, cap)
    local = jnp.where(mine, local, 0)
    with jax.named_scope('dispatch'):
      xe = moe_lib.dispatch(x, local, pos_local, lay.local_experts, cap)  # [b, E_loc, C, D]
    ye = self._experts(p, xe, key, group_offset + jnp.arange(h.shape[0]), ids)
    with jax.named_scope('combine'):
      y = moe_lib.combine(ye, local, pos_local, route['gates'])
    return y, stats

  def _moe_part_all_to_all(self, p, h, key, device, group_offset, placement=None):
    """Expert-parallel MoE inside the expert row: h[b,T,D] -> y[b,T,D] on every expert device.

    Expert device c routes its 1/n_moe of the sequences, sends every expert's capacity buffer to
    the device that holds it (all_to_all over the expert row), runs its experts on the tokens of
    all sequences, sends the outputs back (all_to_all), combines them, and all_gathers the row's
    sequences so that each expert device holds the whole micro-batch's output.
    """
    cfg, lay = self.config.model, self.layout
    share = h.shape[0] // lay.n_moe
    h_local = lax.dynamic_slice_in_dim(h, lax.axis_index(EXPERT_AXIS) * share, share)
    x, route, stats, pos, cap = self._route(p, h_local)  # x: [b/n, T, D]
    slots, ids = self._slots(route['experts'], placement, device)
    with jax.named_scope('dispatch'):
      xe = moe_lib.dispatch(x, slots, pos, cfg.num_experts, cap)  # [b/n, E slots, C, D]
      # xe[G/n, E, C, D] -> [G, E/n, C, D]: each device receives its experts' slots of all groups.
      xe = lax.all_to_all(xe, EXPERT_AXIS, split_axis=1, concat_axis=0, tiled=True)
    ye = self._experts(p, xe, key, group_offset + jnp.arange(h.shape[0]), ids)
    with jax.named_scope('combine'):
      # ye[G, E/n, C, D] -> [G/n, E, C, D]: outputs return to the devices that routed them.
      ye = lax.all_to_all(ye, EXPERT_AXIS, split_axis=0, concat_axis=1, tiled=True)
      y = moe_lib.combine(ye, slots, pos, route['gates'])  # [b/n, T, D]
      y = lax.all_gather(y, EXPERT_AXIS, axis=0, tiled=True)  # y[b/n..] -> y[b, T, D]
    return y, stats

  def _run_ticks(self, xs, attention, experts, extra_shape, operands, zero_stats, grads=None):
    """The static co-execution schedule, shared by training and generation.

    Args:
      xs: per micro-batch residual streams [b, T, D], device-varying (they enter the switch).
      attention: (layer, micro, x, operands, weights) -> (out, extra); the attention devices'
        work of a tick: out[b,T,D]{U_heads}, or out[s,T,D] of the device's sequence slots with
        attn_sharding='batch'. `extra` is whatever the caller keeps per item (the
        new keys and values in generation, None in training). `weights` is the layer's weights
        in training (see `grads`) and None in generation.
      experts: (layer, micro, h, operands, weights) -> (y[b,T,D], stats); the expert devices'
        work.
      extra_shape: the shapes and dtypes (`jax.ShapeDtypeStruct`) of `extra`, or None.
      operands: what the roles read besides their input and weights (in training the dropout
        keys, in generation the arena holding the KV cache and the expert weights),
        device-varying; passed to every branch.
      zero_stats: () -> zero statistics shaped like `experts`' (device-varying), what a role
        without expert work returns.
      grads: training only, (per-layer weights, per-layer sinks) from `_sink_weights`. Each
        tick then runs through `_switch_into_sinks`: its backward recomputes the role's work
        and adds the weight gradients into the layer's sink inside the conditional.

    The branches close over no traced value (a custom VJP's backward may not): `attention`,
    `experts` and the zeros a role without work returns read only their arguments.

    Returns:
      (xs, stats, extras): the final residual streams, the statistics summed over the expert
      ticks, and {(layer, micro): extra} of every attention item.
    """
    device = mesh_lib.device_index()
    is_attn = device < self.layout.n_attn
    b, dtype = xs[0].shape[0], xs[0].dtype
    rows = self.layout.seq_slots(b) if self.batch_attn else b
    attn_shape = jax.ShapeDtypeStruct((rows, *xs[0].shape[1:]), dtype)

    def zero_outputs():
      """(attention output, MoE output, stats, extra) of a role without work: zeros,
      device-varying."""
      zeros = lambda a: _to_varying(jnp.zeros(a.shape, a.dtype))
      extra = jax.tree.map(zeros, extra_shape)
      return zeros(attn_shape), zeros(xs[0]), zero_stats(), extra

    def idle_branch(x_in, h_in, operands, weights):
      return zero_outputs()

    def attn_branch(layer, micro):
      def run(x_in, h_in, operands, weights):
        part, extra = attention(layer, micro, x_in, operands, weights and weights[layer])
        _, moe, stats, _ = zero_outputs()
        return part.astype(dtype), moe, stats, extra

      return run

    def moe_branch(layer, micro):
      def run(x_in, h_in, operands, weights):
        y, st = experts(layer, micro, h_in, operands, weights and weights[layer])
        attn, _, _, extra = zero_outputs()
        return attn, y.astype(dtype), st, extra

      return run

    # Residual streams per micro-batch: xs before attention, hs after. The tick table is static,
    # so the loop unrolls and every tick touches (and autodiff saves) only its own
    # micro-batches' [b, T, D] slices. Values are typed device-varying: ppermute results are
    # not known to be replicated.
    xs, hs = list(xs), list(xs)
    sinks = list(grads[1]) if grads else None
    _, zeros, stats, _ = zero_outputs()
    extras = {}
    for t in self.ticks:
      x_in = xs[t.attn[1]] if t.attn else zeros
      h_in = hs[t.moe[1]] if t.moe else zeros
      # Branch order is fixed (attention, experts, idle); a role with no item this tick idles.
      branches = (
        attn_branch(*t.attn) if t.attn else idle_branch,
        moe_branch(*t.moe) if t.moe else idle_branch,
        idle_branch,
      )
      role = jnp.where(is_attn, 0 if t.attn else 2, 1 if t.moe else 2)
      if grads is None:  # generation
        attn, moe, st, extra = lax.switch(role, branches, x_in, h_in, operands, None)
      else:
        used = sorted({item[0] for item in (t.attn, t.moe) if item})
        (attn, moe, st, extra), tick_sinks = _switch_into_sinks(
          role,
          branches,
          (x_in, h_in, operands),
          {i: grads[0][i] for i in used},
          {i: sinks[i] for i in used},
        )
        for i in used:
          sinks[i] = tick_sinks[i]
      attn, moe = self._exchange(attn, moe)
      stats = jax.tree.map(jnp.add, stats, st)
      if t.attn:
        hs[t.attn[1]] = xs[t.attn[1]] + attn
        extras[t.attn] = extra
      if t.moe:
        xs[t.moe[1]] = hs[t.moe[1]] + moe
    return xs, stats, extras

  def _zero_stats(self):
    mcfg = self.config.model
    e, k = mcfg.num_experts, mcfg.top_k
    route = {
      'logits': jnp.zeros((1, 1, e)),
      'probs': jnp.zeros((1, 1, e)),
      'experts': jnp.zeros((1, 1, k), jnp.int32),
    }
    stats = jax.tree.map(jnp.zeros_like, moe_lib.routing_stats(route, e))
    stats['dropped'] = jnp.zeros(())
    return _to_varying(stats)

  def _kv_layout(self) -> tuple[int, int]:
    """(sequences, heads) of an attention device's KV cache per layer: the whole batch on its
    head slots, or with attn_sharding='batch' all heads of its sequence slots of every
    micro-batch (micro-batch m's slots at rows [m * s, (m + 1) * s))."""
    m, lay = self.config.model, self.layout
    if self.batch_attn:
      return self.config.parallel.num_microbatches * lay.seq_slots(self._micro_batch), m.num_heads
    return self.config.data.batch_size, lay.head_slots

  def _head_mask(self, device):
    """[head_slots] 1 for this device's real heads, 0 for padding slots (none on expert devices)."""
    counts = jnp.asarray(self.layout.head_counts())
    return (jnp.arange(self.layout.head_slots) < counts[device]).astype(jnp.float32)

  def loss(self, params, batch, dropout_key, residual=None, placement=None):
    """See `base.Strategy.loss`; `placement` [E] int32 is parallel.rebalance_every's expert ->
    slot table (None: the identity), which `params` are laid out by (`from_reference`)."""
    cfg, lay = self.config, self.layout
    mcfg = cfg.model
    n_mb = cfg.parallel.num_microbatches
    b = cfg.data.batch_size // n_mb
    dtype = jnp.dtype(mcfg.compute_dtype)

    def program(params, batch, key, placement=None):
      device = mesh_lib.device_index()
      inputs, targets = batch[:, :-1], batch[:, 1:]  # [B, T]
      x0 = params['embed'][inputs].astype(dtype)  # [B, T, D]
      keys = model_lib.layer_keys(key, mcfg.num_layers)
      blocks = _to_varying(params['blocks'])
      # One slice per layer, taken once outside the ticks: a tick's switch then closes over its
      # layer's weights only, so its backward returns that layer's gradient (not a zero-padded
      # gradient of every layer's stacked weights per tick, which held ~150 GB on the paper
      # config). The gradient itself flows through the layer's sink (see `_sink_weights`).
      per_layer = [jax.tree.map(lambda p, i=i: p[i], blocks) for i in range(mcfg.num_layers)]

      # A tick's backward recomputes its role's forward (`_switch_into_sinks`) whatever
      # model.remat says; model.remat decides what that recomputed forward keeps for its own
      # backward.
      attention_part = model_lib.remat(self._attention_part, mcfg)
      moe_part = model_lib.remat(
        self._moe_part if self.dispatch == 'replicated' else self._moe_part_all_to_all, mcfg
      )

      def attention(i, micro, x_in, operands, weights):
        return attention_part(weights, x_in, mesh_lib.device_index()), None

      def experts(i, micro, h_in, operands, weights):
        keys, slots = operands
        k = None if keys is None else keys[i]
        return moe_part(weights, h_in, k, mesh_lib.device_index(), micro * b, slots)

      xs = [_to_varying(x0[m * b : (m + 1) * b]) for m in range(n_mb)]
      xs, stats, _ = self._run_ticks(
        xs,
        attention,
        experts,
        None,
        _to_varying((keys, placement)),
        self._zero_stats,
        _sink_weights(per_layer),
      )
      xs = jnp.concatenate(xs, axis=0)  # [B, T, D]
      # With replicated dispatch every expert device routed every token: divide by n_moe.
      copies = lay.n_moe if self.dispatch == 'replicated' else 1
      stats = jax.tree.map(lambda s: lax.psum(s, ALL_AXES) / copies, stats)
      ce_sum = self._head_loss(params, xs.reshape(-1, xs.shape[-1]), targets.reshape(-1), device)
      ce_sum = lax.psum(ce_sum, ALL_AXES)  # ce{U_all} -> ce: tokens were split over devices
      return base.finalize(cfg, ce_sum, stats)

    return self.shard_loss(program, params, batch, dropout_key, residual, placement)

  # -------------------------------------------------------------------------------------------
  # Generation: the same ticks; the KV cache lives in the attention devices' head slots.
  # -------------------------------------------------------------------------------------------

  def decode_batch_multiple(self):
    """M micro-batches; all_to_all dispatch also splits each one's sequences over the experts.

    The dispatch is resolved for the batch this strategy was built with ('auto' takes
    all_to_all only where the micro-batch divides over the expert devices).
    """
    p = self.config.parallel
    return p.num_microbatches * (self.layout.n_moe if self.dispatch == 'all_to_all' else 1)

  def arena_layout(self, context: int) -> dict[str, int]:
    """Rows of generation's per-device arena, a [rows, head_dim] buffer in the compute dtype.

    One SPMD program gives every device same-shaped buffers, so a plain KV cache would sit on the
    expert devices unread, and the expert weights on the attention devices. The arena holds
    both in the same bytes: an expert device keeps its experts' w_in then w_out in it
    (`expert_rows` each), an attention device its KV cache, k then v (`kv_rows` each,
    [L, B, S, head_slots, H], or [L, M * seq_slots, S, N, H] with attn_sharding='batch'). The
    tail (`scratch` rows from `scratch_start`) takes the expert devices' share of each KV write.
    Rows of head_dim elements keep every index in int32.
    """
    m, lay = self.config.model, self.layout
    if (m.d_model * m.expert_hidden) % m.head_dim:
      raise ConfigError(
        f'model.d_model * model.expert_hidden = {m.d_model * m.expert_hidden} is not a '
        f'multiple of head_dim={m.head_dim} (the generation arena stores experts in rows of it)'
      )
    expert_rows = m.num_layers * lay.local_experts * m.d_model * m.expert_hidden // m.head_dim
    seqs, heads = self._kv_layout()
    kv_rows = m.num_layers * seqs * context * heads
    scratch_start = max(2 * expert_rows, 2 * kv_rows)
    scratch = context * heads  # one sequence's rows of one layer: any write fits
    return {
      'expert_rows': expert_rows,
      'kv_rows': kv_rows,
      'scratch_start': scratch_start,
      'scratch': scratch,
      'rows': scratch_start + scratch,
    }

  def prepare_decode(self, params, context):
    """Moves the expert weights into the arena (the cache of attention devices); see
    `arena_layout`. Returns (params without w_in / w_out, {'arena': [n * rows, H]})."""
    arena_rows, h = self.arena_layout(context)['rows'], self.config.model.head_dim

    def build(w_in, w_out):
      # w_in[L, E_loc, D, F], w_out[L, E_loc, F, D]: this device's expert slots (zeros on
      # attention devices, which makes their initial cache zeros).
      parts = [w_in.reshape(-1, h), w_out.reshape(-1, h)]
      pad = arena_rows - parts[0].shape[0] - parts[1].shape[0]
      return jnp.concatenate([*parts, jnp.zeros((pad, h), w_in.dtype)])

    moe = params['blocks']['moe']
    arena = jax.jit(
      jax.shard_map(build, mesh=self.mesh, in_specs=(_SLOTTED, _SLOTTED), out_specs=P(ALL_AXES))
    )(moe['w_in'], moe['w_out'])
    rest = jax.tree.map(lambda x: x, params)
    del rest['blocks']['moe']['w_in'], rest['blocks']['moe']['w_out']
    return rest, {'arena': arena}

  def forward_cached(self, params, cache, tokens, start):
    cfg = self.config
    mcfg, lay = cfg.model, self.layout
    n_mb = cfg.parallel.num_microbatches
    batch, t = tokens.shape
    if batch != cfg.data.batch_size or batch % self.decode_batch_multiple():
      raise ConfigError(
        f'decode batch={batch} must equal the strategy batch {cfg.data.batch_size} and divide '
        f'over {self.decode_batch_multiple()} (num_microbatches x expert devices of the dispatch)'
      )
    context = self._arena_context(cache['arena'].shape[0] // lay.n_devices)
    arena_at = self.arena_layout(context)
    b = batch // n_mb
    dtype = jnp.dtype(mcfg.compute_dtype)
    prefill = start is None
    moe_part = self._moe_part if self.dispatch == 'replicated' else self._moe_part_all_to_all
    seqs, heads = self._kv_layout()  # of each attention device's cache
    per_micro = seqs // n_mb  # cache rows of one micro-batch
    cache_shape = (mcfg.num_layers, seqs, context, heads, mcfg.head_dim)
    w_rows = arena_at['expert_rows'] // mcfg.num_layers  # one layer's w_in (or w_out)

    def program(params, arena, tokens, start):
      device = mesh_lib.device_index()
      is_attn = device < lay.n_attn
      x0 = params['embed'][tokens].astype(dtype)  # [B, T, D]
      blocks = _to_varying(params['blocks'])
      layer = lambda i: jax.tree.map(lambda p: p[i], blocks)
      rows = lambda m: slice(m * b, (m + 1) * b)
      # The micro-batch's sequences of each of this device's cache rows, and their starts.
      if self.batch_attn:
        mine = self._sequence_slots(device, b)  # [seq_slots]
      else:
        mine = jnp.arange(b)
      starts = [None if prefill else _to_varying(start[m * b + mine]) for m in range(n_mb)]
      head_mask = None if self.batch_attn else self._head_mask(device)
      kv = lambda arena, j: arena[j * arena_at['kv_rows'] : (j + 1) * arena_at['kv_rows']].reshape(
        cache_shape
      )

      def attention(i, micro, x_in, arena, weights):
        # This device's cache rows of the micro-batch, k, v [b, S, slots, H] from the arena (with
        # attn_sharding='batch' [seq_slots, S, N, H] of its sequences, whose inputs it takes).
        p = layer(i)
        if self.batch_attn:
          x_in = jnp.take(x_in, mine, axis=0)
        h = attn_lib.rms_norm(x_in, p['attn_norm']['scale'])
        cache_rows = slice(micro * per_micro, (micro + 1) * per_micro)
        with jax.named_scope('attention'):
          out, k, v = attn_lib.attention_cached(
            h,
            p['attn'],
            kv(arena, 0)[i, cache_rows],
            kv(arena, 1)[i, cache_rows],
            starts[micro],
            mcfg.rope_base,
            head_mask,
          )
        return out, (k.astype(arena.dtype), v.astype(arena.dtype))

      def experts(i, micro, h_in, arena, weights):
        # This device's experts of layer i, w_in [E_loc, D, F] and w_out [E_loc, F, D], from
        # the arena.
        p = layer(i)
        w_in = arena[i * w_rows : (i + 1) * w_rows]
        w_out = arena[arena_at['expert_rows'] + i * w_rows :][:w_rows]
        e, d, f = lay.local_experts, mcfg.d_model, mcfg.expert_hidden
        p['moe'] = {**p['moe'], 'w_in': w_in.reshape(e, d, f), 'w_out': w_out.reshape(e, f, d)}
        return moe_part(p, h_in, None, device, micro * b)

      kv_new = jax.ShapeDtypeStruct((per_micro, t, heads, mcfg.head_dim), arena.dtype)
      xs = [_to_varying(x0[rows(m)]) for m in range(n_mb)]
      xs, _, extras = self._run_ticks(
        xs, attention, experts, (kv_new, kv_new), arena, self._zero_stats
      )
      # Write the new keys and values: attention devices into their cache rows, expert devices
      # (whose rows hold weights) into the scratch tail.
      first = jnp.zeros((seqs,), jnp.int32) if prefill else jnp.concatenate(starts)
      first = first * heads + jnp.arange(seqs) * context * heads  # [seqs] row of each sequence
      span = jnp.arange(t * heads)
      for i in range(mcfg.num_layers):
        for j in (0, 1):
          new = jnp.concatenate([extras[(i, m)][j] for m in range(n_mb)])  # [seqs, T, heads, H]
          offset = (j * mcfg.num_layers + i) * seqs * context * heads
          row = jnp.where(is_attn, offset + first, arena_at['scratch_start'])  # [seqs]
          arena = arena.at[row[:, None] + span[None, :]].set(
            new.reshape(seqs, t * heads, mcfg.head_dim)
          )
      # Every device holds the final residual stream; each computes the head for all tokens
      # (decode reads the head's weights once whatever the token count) and returns its own
      # copy, of which the caller takes device 0's: no collective.
      logits = model_lib.head_logits(params, jnp.concatenate(xs, axis=0))  # [B, T, V]
      return logits, arena

    logits, arena = jax.shard_map(
      program,
      mesh=self.mesh,
      in_specs=(self.param_specs(params), P(ALL_AXES), P(), P()),
      out_specs=(P(ALL_AXES), P(ALL_AXES)),
    )(params, cache['arena'], tokens, jnp.zeros((batch,), jnp.int32) if prefill else start)
    return logits[:batch], {'arena': arena}

  def _arena_context(self, rows: int) -> int:
    """The context an arena of `rows` rows per device was laid out for (inverse of the layout)."""
    m, (seqs, slots) = self.config.model, self._kv_layout()
    experts = 2 * self.arena_layout(1)['expert_rows']
    kv_per_context = 2 * m.num_layers * seqs * slots
    for context in ((rows - experts) // slots, rows // (kv_per_context + slots)):
      if context > 0 and self.arena_layout(context)['rows'] == rows:
        return context
    raise ValueError(f'no context gives an arena of {rows} rows per device')

  def _head_loss(self, params, x, targets, device):
    """Final norm, output head and cross entropy of this device's 1/n of the tokens."""
    n_tok = x.shape[0] // self.layout.n_devices
    x = lax.dynamic_slice_in_dim(x, device * n_tok, n_tok)  # [B*T/n, D]
    t = lax.dynamic_slice_in_dim(targets, device * n_tok, n_tok)
    return model_lib.head_cross_entropy_sum(self.config.model, params, x, t)
