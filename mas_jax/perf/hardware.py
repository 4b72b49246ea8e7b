"""The hardware the planner models: one GPU's peaks and its links, presets and JSON overrides."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

# Fraction of HBM usable by weights, optimizer state and activations (the rest: runtime, buffers).
USABLE_HBM = 0.9


@dataclasses.dataclass(frozen=True)
class Hardware:
  """One GPU and its links. Bandwidths are bytes/s per GPU, one direction; FLOP/s dense peaks."""

  name: str
  bf16_flops: float
  fp8_flops: float
  hbm_bw: float
  hbm_bytes: float
  scale_up_bw: float
  scale_out_bw: float
  gpus_per_node: int
  scale_up_latency: float = 5e-6
  scale_out_latency: float = 10e-6

  def peak_flops(self, dtype: str) -> float:
    """Dense peak for a compute dtype; float32 matmuls are taken at the bf16 (TF32-class) rate."""
    return self.fp8_flops if dtype in ('float8', 'fp8') else self.bf16_flops


# Datasheet peaks, dense (no sparsity). NVLink: the per-direction half of the quoted total.
# Scale-out: one 200 Gb/s (A100) or 400 Gb/s (Hopper, Blackwell) NIC per GPU.
HARDWARE = {
  # A100 has no FP8 tensor cores: FP8 runs at the bf16 rate.
  'a100_80g': Hardware('a100_80g', 312e12, 312e12, 2.039e12, 80e9, 300e9, 25e9, 8),
  'h100': Hardware('h100', 989.4e12, 1978.9e12, 3.35e12, 80e9, 450e9, 50e9, 8),
  'h200': Hardware('h200', 989.4e12, 1978.9e12, 4.8e12, 141e9, 450e9, 50e9, 8),
  # H800: the export Hopper, NVLink cut to 400 GB/s total (the AFD paper sustains 160 of 200).
  'h800': Hardware('h800', 989.4e12, 1978.9e12, 3.35e12, 80e9, 200e9, 50e9, 8),
  # GB200 NVL72: a 72-GPU NVLink domain counts as one node.
  'gb200': Hardware('gb200', 2.5e15, 5.0e15, 8.0e12, 186e9, 900e9, 50e9, 72),
}


def load_hardware(name_or_path: str, overrides: dict[str, Any] | None = None) -> Hardware:
  """Returns a preset or a JSON file of figures, with `overrides` applied on top.

  Args:
    name_or_path: a key of HARDWARE, or a JSON file {"base": "<preset>", "<field>": value, ...}
      whose fields replace the base preset's (measured values).
    overrides: Hardware field name -> value.

  Returns:
    The Hardware.
  """
  if name_or_path in HARDWARE:
    hw = HARDWARE[name_or_path]
  else:
    with open(name_or_path) as f:
      figures = json.load(f)
    base = HARDWARE[figures.pop('base', 'a100_80g')]
    hw = dataclasses.replace(base, **figures)
  return dataclasses.replace(hw, **(overrides or {}))
