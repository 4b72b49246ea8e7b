"""Collective times on the hardware's two-level network (NVLink inside a node, NICs across).

Devices are numbered as the strategies' meshes number them and placed `gpus_per_node` to a node
in that order. A group is described by its members per node (`local`) and the nodes it spans;
bandwidth terms of a hierarchical algorithm run one after the other, plus a per-op latency.
"""

from __future__ import annotations

import math

from mas_jax.perf.hardware import Hardware
from mas_jax.perf.prediction import Collective, Cost


def _largest(parts: dict[str, float]) -> tuple[float, str]:
  name = max(parts, key=parts.get)
  return parts[name], name


def placement(devices: list[int], hw: Hardware) -> tuple[int, int]:
  """(members per node, nodes) of a group of device ids (the busiest node's count)."""
  per_node: dict[int, int] = {}
  for d in devices:
    per_node[d // hw.gpus_per_node] = per_node.get(d // hw.gpus_per_node, 0) + 1
  return max(per_node.values()), len(per_node)


def strided(first: int, size: int, stride: int) -> list[int]:
  return [first + i * stride for i in range(size)]


def collective(
  name: str,
  kind: str,
  devices: list[int],
  nbytes: float,
  count: int,
  hw: Hardware,
  pairs: list[tuple[int, int]] | None = None,
) -> Collective:
  """A Collective over the group `devices` (collective-permute: over the (source, target)
  `pairs`, whose number is its HLO group size)."""
  if pairs is not None:
    crosses = any(a // hw.gpus_per_node != b // hw.gpus_per_node for a, b in pairs)
    return Collective(name, kind, len(pairs), nbytes, count, 1, 2 if crosses else 1)
  local, nodes = placement(devices, hw)
  return Collective(name, kind, len(devices), nbytes, count, local, nodes)


def all_reduce(nbytes: float, ranks: int, hw: Hardware, local: int | None = None) -> Cost:
  """Hierarchical all-reduce of `nbytes` per rank over `ranks` GPUs, `local` of them per node
  (default: contiguous ranks).

  Reduce-scatter over NVLink inside a node, all-reduce of each 1/local shard across nodes over
  every GPU's own NIC, all-gather over NVLink: the bandwidth terms run one after the other.
  """
  if ranks <= 1 or nbytes <= 0:
    return Cost(0.0, 'none')
  local = min(ranks, hw.gpus_per_node) if local is None else local
  nodes = math.ceil(ranks / local)
  t_up = 2 * (local - 1) / local * nbytes / hw.scale_up_bw
  t_out = 2 * (nodes - 1) / nodes * nbytes / local / hw.scale_out_bw if nodes > 1 else 0.0
  latency = 2 * hw.scale_up_latency + (2 * hw.scale_out_latency if nodes > 1 else 0.0)
  _, bound = _largest({'scale-up': t_up, 'scale-out': t_out, 'latency': latency})
  return Cost(t_up + t_out + latency, bound)


def all_to_all(nbytes: float, ranks: int, hw: Hardware, local: int | None = None) -> Cost:
  """All-to-all where each rank sends `nbytes` spread evenly over the other ranks."""
  if ranks <= 1 or nbytes <= 0:
    return Cost(0.0, 'none')
  local = min(ranks, hw.gpus_per_node) if local is None else local
  inside = nbytes * (local - 1) / (ranks - 1)
  t_up, t_out = inside / hw.scale_up_bw, (nbytes - inside) / hw.scale_out_bw
  latency = hw.scale_out_latency if ranks > local else hw.scale_up_latency
  t, bound = _largest({'scale-up': t_up, 'scale-out': t_out})
  return Cost(t + latency, bound if t > latency else 'latency')


def time(c: Collective, hw: Hardware) -> Cost:
  """Time of all `c.count` ops of a collective, `c.bytes` per device in total."""
  if c.group <= 1 or c.bytes <= 0:
    return Cost(0.0, 'none')
  per_op = c.bytes / c.count
  if c.kind == 'all-reduce':
    t = all_reduce(per_op, c.group, hw, c.local)
  elif c.kind == 'all-to-all':
    t = all_to_all(per_op * (c.group - 1) / c.group, c.group, hw, c.local)
  elif c.kind in ('all-gather', 'reduce-scatter'):
    # Ring over the group: (g - 1) / g of the gathered size crosses each device's link.
    full = per_op if c.kind == 'all-gather' else per_op * c.group
    t = all_reduce(full / 2, c.group, hw, c.local)  # half an all-reduce's traffic
  elif c.kind == 'collective-permute':
    across = c.nodes > 1
    bw, lat = (
      (hw.scale_out_bw, hw.scale_out_latency) if across else (hw.scale_up_bw, hw.scale_up_latency)
    )
    t = Cost(per_op / bw + lat, 'scale-out' if across else 'scale-up')
  else:
    raise ValueError(f'unknown collective kind {c.kind!r}')
  return Cost(t.time_s * c.count, t.bound)
