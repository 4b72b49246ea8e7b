"""The collectives a compiled program runs, read from its HLO text (no JAX needed).

`collectives(hlo_text)` walks the module's call graph from ENTRY: a while loop's body runs its
known trip count times, a call or fusion once, and every branch of a conditional once per
execution of the conditional (in an SPMD program with per-device branches, e.g. ma_sep's
`lax.switch`, a device runs one branch, so a collective inside a branch is run by the devices
that take it). Each collective is reported with its kind, the size of its device groups and
the bytes of its result on one device, summed over executions. XLA's combiners merge
collectives of the same kind and groups into one tuple-shaped op; the bytes are unchanged, so
compare sums per (kind, group size), not op counts.

The bytes convention (the planner's `Collective.bytes` follows it): the result on one device.
For all-reduce, all-to-all and collective-permute that is the input; for all-gather the gathered
output (group x input); for reduce-scatter the scattered output (input / group).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re

KINDS = ('all-reduce', 'all-to-all', 'collective-permute', 'all-gather', 'reduce-scatter')

_DTYPE_BYTES = {
  'pred': 1,
  's8': 1,
  'u8': 1,
  'f8e4m3fn': 1,
  'f8e5m2': 1,
  's16': 2,
  'u16': 2,
  'f16': 2,
  'bf16': 2,
  's32': 4,
  'u32': 4,
  'f32': 4,
  's64': 8,
  'u64': 8,
  'f64': 8,
}
_SHAPE = re.compile(r'\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]')
_COMPUTATION = re.compile(r'^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$')


@dataclasses.dataclass(frozen=True)
class Collective:
  """Collectives of one kind over groups of `group` devices: `bytes` per device, `count` ops."""

  kind: str
  group: int
  bytes: float
  count: int = 1


def type_bytes(type_text: str) -> int:
  """Bytes of an HLO type, e.g. 'f32[64,8]{1,0}' or a tuple '(f32[2], bf16[4,4])'."""
  total = 0
  for dtype, dims in _SHAPE.findall(type_text):
    if dtype not in _DTYPE_BYTES:
      continue
    n = 1
    for d in filter(None, dims.split(',')):
      n *= int(d)
    total += n * _DTYPE_BYTES[dtype]
  return total


def _group_size(rest: str) -> int:
  """Devices per group of a collective's replica_groups (iota, mesh-axes or explicit form)."""
  m = re.search(r'replica_groups=\[(\d+),(\d+)\]<=', rest)
  if m:
    return int(m.group(2))
  # replica_groups=mesh['axis_0'=16,'axis_1'=1] {'axis_0'}: a group spans the braced axes.
  m = re.search(r'replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}', rest)
  if m:
    sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
    return math.prod(sizes[a] for a in re.findall(r"'([^']+)'", m.group(2)))
  m = re.search(r'replica_groups=\{\{([0-9,]*)\}', rest)
  if m:
    return len(m.group(1).split(','))
  m = re.search(r'source_target_pairs=\{([^=]*)\}', rest)
  if m:  # a permutation: the "group" is the number of (source, target) pairs
    return len(re.findall(r'\{\d+,\d+\}', m.group(1)))
  return 1


def _parse(text: str) -> tuple[dict[str, list[tuple[str, str, str]]], str]:
  """{computation: [(opcode, result type, rest of line)]} and the ENTRY computation's name."""
  comps, entry, current = {}, None, None
  for line in text.split('\n'):
    m = _COMPUTATION.match(line)
    if m:
      current = m.group(2)
      comps[current] = []
      if m.group(1):
        entry = current
      continue
    if current is None:
      continue
    m = _INSTRUCTION.match(line)
    if m:
      comps[current].append((m.group(3), m.group(2), m.group(4)))
  if entry is None:
    raise ValueError('no ENTRY computation in the HLO text')
  return comps, entry


def _callees(opcode: str, rest: str) -> list[tuple[str, int]]:
  """(computation, executions per execution of the instruction) that an instruction calls."""
  if opcode == 'while':
    body = re.search(r'body=%?([\w.\-]+)', rest).group(1)
    trip = re.search(r'known_trip_count[^0-9]*(\d+)', rest)
    if trip is None:
      raise ValueError(f'while loop {body} has no known trip count')
    return [(body, int(trip.group(1)))]
  if opcode == 'conditional':
    m = re.search(r'branch_computations=\{([^}]*)\}', rest)
    names = (
      m.group(1).split(',') if m else re.findall(r'(?:true|false)_computation=%?([\w.\-]+)', rest)
    )
    return [(n.strip().lstrip('%'), 1) for n in names]
  out = []
  for key in ('to_apply', 'calls'):
    for m in re.finditer(key + r'=%?([\w.\-]+)', rest):
      out.append((m.group(1), 1))
  # Reductions' to_apply computations hold no collectives; following them is harmless.
  return out


def collectives(text: str) -> list[Collective]:
  """Every collective the program runs per execution, summed per (kind, group size)."""
  comps, entry = _parse(text)
  runs: dict[str, int] = collections.Counter()

  def visit(name: str, times: int) -> None:
    runs[name] += times
    for opcode, _, rest in comps.get(name, []):
      for callee, n in _callees(opcode, rest):
        if callee in comps:
          visit(callee, times * n)

  visit(entry, 1)
  totals: dict[tuple[str, int], list[float]] = {}
  for name, times in runs.items():
    for opcode, result, rest in comps[name]:
      kind = opcode.removesuffix('-start')
      if kind not in KINDS or opcode.endswith('-done'):
        continue
      key = (kind, _group_size(rest))
      acc = totals.setdefault(key, [0.0, 0])
      acc[0] += times * type_bytes(result)
      acc[1] += times
  return [Collective(k, g, b, int(c)) for (k, g), (b, c) in sorted(totals.items())]


def as_table(items: list[Collective]) -> str:
  return json.dumps([dataclasses.asdict(c) for c in items], indent=1)
