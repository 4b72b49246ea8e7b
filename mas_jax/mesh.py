"""The MA Separation role mesh: axis names, device -> role map, head and expert assignment.

For a split of `n_attn + n_moe` devices the mesh has `C = gcd(n_attn, n_moe)` columns; the first
`n_attn / C` rows are attention devices and the remaining `n_moe / C` rows expert devices
(12:4 -> a (4, 4) mesh: 3 attention rows and 1 expert row). The row axis is `ATTN_AXIS`, the
column axis `EXPERT_AXIS`. A device's linear index is `row * C + col`, so attention devices are
0 .. n_attn - 1 and expert devices n_attn .. n_attn + n_moe - 1. This module is the only place
that knows the mapping.

Heads follow the seed's formula: attention device i owns heads [floor(i * N / A),
floor((i + 1) * N / A)), which gives every device floor(N / A) or ceil(N / A) heads. Parameters
hold `ceil(N / A)` head slots per device (`head_slots`); slots past a device's own count are
padding, masked in the graph. Under attn_sharding='batch' every attention device holds all heads
and the same formula splits each micro-batch's sequences instead (`sequences_of`), padded to
`seq_slots` per device. Experts: expert device j owns experts [j * E / n_moe,
(j + 1) * E / n_moe).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

ATTN_AXIS = 'attn'
EXPERT_AXIS = 'expert'
ALL_AXES = (ATTN_AXIS, EXPERT_AXIS)


@dataclasses.dataclass(frozen=True)
class RoleLayout:
  """Static placement of a split: mesh shape, heads and experts per device."""

  n_attn: int
  n_moe: int
  num_heads: int
  num_experts: int

  @property
  def n_devices(self) -> int:
    return self.n_attn + self.n_moe

  @property
  def cols(self) -> int:
    return math.gcd(self.n_attn, self.n_moe)

  @property
  def attn_rows(self) -> int:
    return self.n_attn // self.cols

  @property
  def shape(self) -> tuple[int, int]:
    return (self.n_devices // self.cols, self.cols)

  @property
  def head_slots(self) -> int:
    """Head slots per device (every device holds the same number)."""
    return -(-self.num_heads // self.n_attn)

  @property
  def local_experts(self) -> int:
    return self.num_experts // self.n_moe

  def heads_of(self, device: int) -> range:
    """Heads of attention device `device` (the seed's head_start = i * N / A); empty for experts."""
    if device >= self.n_attn:
      return range(0)
    return range(
      device * self.num_heads // self.n_attn, (device + 1) * self.num_heads // self.n_attn
    )

  def experts_of(self, device: int) -> range:
    if device < self.n_attn:
      return range(0)
    j = device - self.n_attn
    return range(j * self.local_experts, (j + 1) * self.local_experts)

  def slot_heads(self) -> np.ndarray:
    """[n_devices * head_slots] global head of each slot, -1 for padding slots."""
    table = np.full((self.n_devices, self.head_slots), -1, np.int32)
    for d in range(self.n_attn):
      heads = list(self.heads_of(d))
      table[d, : len(heads)] = heads
    return table.reshape(-1)

  def seq_slots(self, batch: int) -> int:
    """Sequence slots per device of a micro-batch of `batch` under attn_sharding='batch'."""
    return -(-batch // self.n_attn)

  def sequences_of(self, device: int, batch: int) -> range:
    """Sequences of a micro-batch that attention device `device` runs under
    attn_sharding='batch' (the head formula applied to sequences); empty for expert devices."""
    if device >= self.n_attn:
      return range(0)
    return range(device * batch // self.n_attn, (device + 1) * batch // self.n_attn)

  def slot_sequences(self, batch: int) -> np.ndarray:
    """[n_devices, seq_slots] sequence of each slot, -1 for padding slots."""
    table = np.full((self.n_devices, self.seq_slots(batch)), -1, np.int32)
    for d in range(self.n_attn):
      seqs = list(self.sequences_of(d, batch))
      table[d, : len(seqs)] = seqs
    return table

  def head_counts(self) -> np.ndarray:
    """[n_devices] real heads per device (0 on expert devices)."""
    return np.array([len(self.heads_of(d)) for d in range(self.n_devices)], np.int32)

  def placement_table(self, micro_batch: int | None = None) -> str:
    """One line per device: id, mesh position, role, heads, experts. With `micro_batch`
    (attn_sharding='batch') the sequences of each micro-batch in place of the heads."""
    what = 'heads' if micro_batch is None else 'sequences'
    lines = [f'{"device":>6}  {"mesh":>7}  {"role":<9} {what:<14} experts']
    for d in range(self.n_devices):
      row, col = divmod(d, self.cols)
      role = 'attention' if d < self.n_attn else 'expert'
      heads = self.heads_of(d) if micro_batch is None else self.sequences_of(d, micro_batch)
      experts = self.experts_of(d)
      h = f'{heads.start}-{heads.stop - 1} ({len(heads)})' if len(heads) else '-'
      e = f'{experts.start}-{experts.stop - 1}' if len(experts) else '-'
      lines.append(f'{d:>6}  ({row:>2},{col:>2})  {role:<9} {h:<14} {e}')
    return '\n'.join(lines)


def make_mesh(layout: RoleLayout, devices: list) -> jax.sharding.Mesh:
  """The (rows, cols) role mesh over `devices` in order."""
  grid = np.asarray(devices[: layout.n_devices], dtype=object).reshape(layout.shape)
  return jax.sharding.Mesh(grid, ALL_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def device_index() -> jax.Array:
  """Linear index of the current device inside shard_map (row * cols + col)."""
  return jax.lax.axis_index(ATTN_AXIS) * jax.lax.axis_size(EXPERT_AXIS) + jax.lax.axis_index(
    EXPERT_AXIS
  )
