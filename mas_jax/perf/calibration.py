"""Calibration: measured kernel timings and rates replace roofline estimates.

Calibration JSON (written by a GPU benchmark; every field optional):
  {"device": "NVIDIA A100-SXM4-80GB",
   "matmul_tflops": 250.0,        # measured dense matmul rate in compute dtype -> peak FLOP/s
   "hbm_gbps": 1800.0,            # measured HBM bandwidth -> hbm_bw
   "scale_up_gbps": 250.0,        # measured per-GPU NVLink bandwidth, one direction
   "scale_out_gbps": 22.0,        # measured per-GPU network bandwidth, one direction
   "kernels": {
     "attention": [               # one layer's attention block on one device, no collectives
       {"mode": "decode", "heads": 3, "batch": 24, "seq": 2048, "time_s": 4.1e-5},
       {"mode": "train", "heads": 3, "batch": 8, "seq": 2048, "time_s": 2.0e-3}],
     "expert_ffn": [              # one layer's experts on one device
       {"local_experts": 4, "tokens": 48, "time_s": 5.3e-4}]}}
  attention: `heads` local heads, `batch` sequences, `seq` context (decode: one new token per
  sequence; train: forward over `seq` tokens, backward taken as 2 x forward). expert_ffn: `tokens`
  routed token-expert pairs reaching the device's `local_experts` experts, before capacity padding
  (the time includes whatever padding the kernel computes; bench/gpu_bench.py writes it so).
  Entries may also give "d_model", "head_dim", "expert_hidden" (local width) or "dropless"
  (expert_ffn: the routing the timing is for; the bench writes the capacity einsum and the grouped
  kernel apart); entries that disagree with the model are ignored. Decode looks up dropless
  timings whatever the model's routing, since generation is always dropless. bench/decode.py
  writes decode entries: attention = norm + cached attention over `seq` keys + the cache write,
  per layer; expert_ffn = the decode path's grouped kernel on `tokens` routed pairs.
  Timings are used for an exact match, or fitted linearly (time = k1 * x + k2, as MegaScale-Infer
  does) through the two nearest entries in batch / tokens with the other keys equal; with a
  single such entry, scaled in proportion to batch / tokens (k2 = 0: these kernels are large
  enough for their launch cost not to count). A kernel with no entry of equal keys stays
  modelled (roofline), and predictions list which terms were measured. Every lookup is recorded
  in `Calibration.lookups` (kernel, axis value, 'exact' / 'line' / 'proportional'), so that a
  validation can tell the rows whose kernels were timed at their own shapes (in sample) from
  those whose kernels were extrapolated (held out): mas_jax/perf/validate.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from mas_jax.perf.hardware import Hardware
from mas_jax.perf.model import ModelSpec


@dataclasses.dataclass
class Calibration:
  """Measured figures of one GPU; schema in the module docstring."""

  device: str = ''
  figures: dict[str, float] = dataclasses.field(default_factory=dict)
  attention: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  expert_ffn: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  # (kernel, axis value, how) of every lookup that found entries; how: exact, line, proportional
  lookups: list[tuple[str, float, str]] = dataclasses.field(default_factory=list)

  @classmethod
  def load(cls, path: str) -> Calibration:
    with open(path) as f:
      raw = json.load(f)
    kernels = raw.get('kernels', {})
    names = ('matmul_tflops', 'hbm_gbps', 'scale_up_gbps', 'scale_out_gbps')
    figures = {k: float(raw[k]) for k in names if raw.get(k) is not None}
    return cls(
      raw.get('device', ''), figures, kernels.get('attention', []), kernels.get('expert_ffn', [])
    )

  def apply(self, hw: Hardware, dtype: str) -> tuple[Hardware, list[str]]:
    """Returns the hardware with measured rates in place of datasheet peaks, and their names."""
    f, changes = self.figures, {}
    if 'matmul_tflops' in f:
      changes['fp8_flops' if dtype in ('float8', 'fp8') else 'bf16_flops'] = (
        f['matmul_tflops'] * 1e12
      )
    for key, field in (
      ('hbm_gbps', 'hbm_bw'),
      ('scale_up_gbps', 'scale_up_bw'),
      ('scale_out_gbps', 'scale_out_bw'),
    ):
      if key in f:
        changes[field] = f[key] * 1e9
    return dataclasses.replace(hw, **changes), sorted(changes)

  def attention_time(self, m: ModelSpec, mode: str, heads: int, batch: float, seq: int):
    """Measured forward time of one layer's attention on one device, or None."""
    required = {'mode': mode, 'heads': heads, 'seq': seq}
    optional = {'d_model': m.d_model, 'head_dim': m.head_dim}
    return self._record('attention', _lookup(self.attention, required, optional, 'batch', batch))

  def expert_time(
    self,
    m: ModelSpec,
    local_experts: float,
    tokens: float,
    hidden: int,
    dropless: bool | None = None,
  ):
    """Measured forward time of one layer's local experts on one device, or None.

    `dropless` is the routing to look up (default: the model's); decode passes True.
    """
    dropless = m.dropless if dropless is None else dropless
    required = {'local_experts': local_experts}
    optional = {'d_model': m.d_model, 'expert_hidden': hidden, 'dropless': dropless}
    return self._record(
      'expert_ffn', _lookup(self.expert_ffn, required, optional, 'tokens', tokens)
    )

  def _record(self, kernel: str, found):
    if found is None:
      return None
    time_s, x, how = found
    self.lookups.append((kernel, x, how))
    return time_s


def _lookup(entries, required, optional, axis, x):
  """(time, x, how): exact match on `axis`, else a line through the two nearest entries, else
  (one entry) in proportion to x; None if no entry has the keys."""
  same = [
    e
    for e in entries
    if all(e.get(k) == v for k, v in required.items())
    and all(e.get(k, v) == v for k, v in optional.items())
  ]
  for e in same:
    if math.isclose(e[axis], x):
      return float(e['time_s']), x, 'exact'
  if not same:
    return None
  if len({e[axis] for e in same}) < 2:
    return float(same[0]['time_s']) * x / same[0][axis], x, 'proportional'
  nearest = sorted(same, key=lambda e: abs(e[axis] - x))
  a = nearest[0]
  b = next(e for e in nearest if e[axis] != a[axis])
  slope = (b['time_s'] - a['time_s']) / (b[axis] - a[axis])
  return max(0.0, a['time_s'] + slope * (x - a[axis])), x, 'line'
