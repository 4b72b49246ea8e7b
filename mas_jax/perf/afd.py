"""The AFD paper's communication roofline and imbalance penalties.

arXiv 2602.09721, Sec. 3 and App. A; ../shared/notes/perf_model.md section 4.
"""

from __future__ import annotations

import dataclasses
import math


def afd_bw_eff(scale_out_bw: float, scale_up_bw: float, top_k: int, n_f_nodes: int) -> float:
  """Eq. 9: inbound bandwidth per FFN rank with two-stage (scale-out, then NVLink) forwarding."""
  return min(scale_out_bw * max(1.0, top_k / n_f_nodes), scale_up_bw)


def afd_hfu_ceiling(
  bw_eff: float,
  ffn_hidden: int,
  peak_flops: float,
  n_mat: int = 3,
  dispatch_bytes: float = 1,
  combine_bytes: float = 2,
) -> float:
  """Eq. 19 generalised: FFN HFU when the link feeds every token the FFN computes.

  A token-expert pair costs 2 * n_mat * H * M FLOPs and H * (dispatch + combine) bytes on the
  link, so HFU = BW_eff * 2 * n_mat * M / (dispatch + combine) / peak, independent of H and of
  the latency budget. SwiGLU with FP8 dispatch and BF16 combine gives the paper's 2 BW M / peak.
  """
  return bw_eff * 2 * n_mat * ffn_hidden / (dispatch_bytes + combine_bytes) / peak_flops


@dataclasses.dataclass(frozen=True)
class AfdSystem:
  """An MoE model on AFD hardware, in the AFD paper's terms (bandwidths in bytes/s)."""

  name: str
  hidden: int  # H
  ffn_hidden: int  # M
  experts: int
  top_k: int
  moe_layers: int
  peak_flops: float
  hbm_bw: float
  scale_out_bw: float
  scale_up_bw: float
  gpus_per_node: int = 8
  n_mat: int = 3
  dispatch_bytes: float = 1
  combine_bytes: float = 2
  weight_bytes: float = 1  # FP8 expert weights


def afd_budget(
  s: AfdSystem, slo_s: float = 0.05, accept: float = 1.7, t_gap: float = 0.015, n_bo: int = 3
) -> float:
  """Eq. 1: per-stage per-micro-batch budget t_B = (SLO * L_accept - t_g) / (layers * N_BO)."""
  return (slo_s * accept - t_gap) / (s.moe_layers * n_bo)


def afd_regime(s: AfdSystem, n_f_nodes: int) -> str:
  """Sec. 3.1: which of the four regimes N_F FFN nodes fall in."""
  if math.ceil(s.experts / (n_f_nodes * s.gpus_per_node)) == 1:
    return 'max intensity'
  if s.top_k / n_f_nodes > s.scale_up_bw / s.scale_out_bw:
    return 'scale-up bound'
  if n_f_nodes >= s.top_k:
    return 'scale-out bound'
  return 'stable intensity'


def afd_roofline(s: AfdSystem, n_f_nodes: int, t_budget: float) -> dict[str, float | str]:
  """HFU bound of the FFN side with N_F nodes: min(link ceiling, HBM roofline at intensity I).

  Eq. 17 B_rank = BW_eff * t_B / bytes per token; Eq. 10 I = 2 B_rank / local experts (per weight
  byte); the GEMMs cannot beat I * HBM bandwidth, nor the link's Eq. 19 ceiling.
  """
  bw = afd_bw_eff(s.scale_out_bw, s.scale_up_bw, s.top_k, n_f_nodes)
  b_rank = bw * t_budget / (s.hidden * (s.dispatch_bytes + s.combine_bytes))
  local = math.ceil(s.experts / (n_f_nodes * s.gpus_per_node))
  intensity = 2 * b_rank / local / s.weight_bytes
  comm = afd_hfu_ceiling(bw, s.ffn_hidden, s.peak_flops, s.n_mat, s.dispatch_bytes, s.combine_bytes)
  mem = intensity * s.hbm_bw / s.peak_flops
  return {
    'regime': afd_regime(s, n_f_nodes),
    'bw_eff': bw,
    'b_rank': b_rank,
    'local_experts': local,
    'intensity': intensity,
    'hfu_comm': comm,
    'hfu_mem': mem,
    'hfu': min(1.0, comm, mem),
  }


def alpha_ep(lam: float, sigma: float) -> float:
  """Eq. 11-12: EP throughput penalty under router skew sigma, lambda = t_a / t_f."""
  return (lam + 1) / (lam + 1 / sigma)


def alpha_afd_exact(sigma: float, n_a: float, n_f: float) -> float:
  """Eq. 13: AFD penalty if attention could shrink to exactly sigma * N_A instances."""
  return sigma * (n_a + n_f) / (sigma * n_a + n_f)


def alpha_afd_discrete(sigma: float, n_a: int, n_f: int) -> float:
  """Eq. 14-16, corrected: whole instances; the better of floor(sigma N_A) and ceil(sigma N_A).

  The printed Eq. 14-15 scale by (lambda_AFD + 1); only (N_A + N_F) / N_A agrees with Eq. 13.
  """
  scale = (n_a + n_f) / n_a
  f, c = math.floor(sigma * n_a), math.ceil(sigma * n_a)
  a_floor = scale * f / (f + n_f)
  a_ceil = scale * c / (c + n_f) * sigma * n_a / c
  return max(a_floor, a_ceil)


def alpha_afd_as_printed(sigma: float, n_a: int, n_f: int) -> float:
  """Eq. 14-16 as printed (factor lambda_AFD + 1): can exceed 1, which is how the typo shows."""
  lam = n_a / n_f
  f, c = math.floor(sigma * n_a), math.ceil(sigma * n_a)
  return max((lam + 1) * f / (f + n_f), (lam + 1) * c / (c + n_f) * sigma * n_a / c)


def _system(name, hidden, ffn_hidden, experts, top_k, moe_layers, peak, hbm, out_bw, up_bw, **kw):
  return AfdSystem(
    name=name,
    hidden=hidden,
    ffn_hidden=ffn_hidden,
    experts=experts,
    top_k=top_k,
    moe_layers=moe_layers,
    peak_flops=peak,
    hbm_bw=hbm,
    scale_out_bw=out_bw,
    scale_up_bw=up_bw,
    **kw,
  )


# AFD paper App. B figures (FP8 TFLOPS, HBM, unidirectional scale-out / scale-up, H800 sustained).
_H800 = {'peak': 1979e12, 'hbm': 3.35e12, 'out_bw': 50e9, 'up_bw': 160e9}
_GB200 = {'peak': 4500e12, 'hbm': 7.7e12, 'out_bw': 720e9, 'up_bw': 720e9}
# The seed model: GELU (2 matrices), bf16 both ways and bf16 weights, 4 A100s per node.
_SEED = {
  'hidden': 4096,
  'ffn_hidden': 16384,
  'experts': 16,
  'top_k': 2,
  'moe_layers': 4,
  'peak': 312e12,
  'hbm': 2.039e12,
  'up_bw': 300e9,
  'gpus_per_node': 4,
  'n_mat': 2,
  'dispatch_bytes': 2,
  'combine_bytes': 2,
  'weight_bytes': 2,
}
SYSTEMS = {
  s.name: s
  for s in (
    _system('DeepSeek-V3 / H800', 7168, 2048, 256, 8, 58, **_H800),
    _system('Step3 / H800', 7168, 5120, 48, 3, 56, **_H800),
    _system('DeepSeek-V3 / GB200', 7168, 2048, 256, 8, 58, **_GB200),
    _system('Kimi-K2 / GB200', 7168, 2048, 384, 8, 60, **_GB200),
    _system('GLM-4.7 / GB200', 5120, 1536, 160, 8, 89, **_GB200),
    _system('seed / A100, HDR per GPU', out_bw=25e9, **_SEED),
    _system('seed / A100, HDR per node', out_bw=6.25e9, **_SEED),
  )
}
