"""Analytic performance model of mas-jax's strategies, the planner, and the paper reproductions.

Pure Python (no JAX): the planner runs anywhere, and a model of the program must not depend on
the program. Each strategy's cost model (`ma_sep`, `tp_pp`, `ep`) follows the code of
mas_jax/strategies/: the same placement, buffers (dummy slots included), collectives (kind,
devices, bytes) and schedule. tests/test_perf_fidelity.py holds the lists of collectives and the
parameter bytes against the compiled programs, so a change to a strategy fails there until its
cost model follows.

Modules: `hardware` (GPU presets), `model` (the model's parameters, FLOPs and bytes; also
metrics.py's MFU), `calibration` (measured kernel timings), `kernels` (per-device kernel times),
`collectives` (network times), `hlo` (the collectives of a compiled program, from its HLO text),
`prediction` (what a prediction holds), `ma_sep`, `tp_pp`, `ep` (one cost model per strategy),
`planner` (ranking every valid placement), `afd` (the AFD paper's roofline), `report`, `plots`,
`reproduce` and `cli` (`python -m mas_jax.perf`).

Equations: ../shared/notes/perf_model.md (MegaScale-Infer, AFD arXiv 2602.09721).
"""

from mas_jax.perf.calibration import Calibration
from mas_jax.perf.collectives import all_reduce, all_to_all
from mas_jax.perf.hardware import HARDWARE, USABLE_HBM, Hardware, load_hardware
from mas_jax.perf.kernels import Kernels, accumulator_update, optimizer_update, roofline
from mas_jax.perf.model import (
  ModelSpec,
  accounting,
  active_matmul_params,
  attn_act_bytes_per_token,
  attn_params_per_layer,
  embed_params,
  expected_active,
  expert_params,
  forward_flops_per_token,
  hit_probability,
  kv_bytes_per_token_layer,
  layer_flops_per_token,
  moe_act_bytes_per_token,
  moe_params_per_layer,
  total_params,
  train_flops_per_token,
)
from mas_jax.perf.planner import best_ma_sep, plan, predict_config
from mas_jax.perf.prediction import (
  ACCUMULATOR_BYTES_PER_PARAM,
  FUSED_ACCUMULATOR_BYTES_PER_PARAM,
  OPTIMIZER_BYTES_PER_PARAM,
  Collective,
  Cost,
  Memory,
  Prediction,
  Term,
  Workload,
)

__all__ = [
  'ACCUMULATOR_BYTES_PER_PARAM',
  'FUSED_ACCUMULATOR_BYTES_PER_PARAM',
  'HARDWARE',
  'OPTIMIZER_BYTES_PER_PARAM',
  'USABLE_HBM',
  'Calibration',
  'Collective',
  'Cost',
  'Hardware',
  'Kernels',
  'Memory',
  'ModelSpec',
  'Prediction',
  'Term',
  'Workload',
  'accounting',
  'accumulator_update',
  'active_matmul_params',
  'all_reduce',
  'all_to_all',
  'attn_act_bytes_per_token',
  'attn_params_per_layer',
  'best_ma_sep',
  'embed_params',
  'expected_active',
  'expert_params',
  'forward_flops_per_token',
  'hit_probability',
  'kv_bytes_per_token_layer',
  'layer_flops_per_token',
  'load_hardware',
  'moe_act_bytes_per_token',
  'moe_params_per_layer',
  'optimizer_update',
  'plan',
  'predict_config',
  'roofline',
  'total_params',
  'train_flops_per_token',
]
