"""Plots of the planner (matplotlib, Agg backend: files only)."""

from __future__ import annotations

from mas_jax import perf as pm
from mas_jax.perf import afd
from mas_jax.perf.afd import SYSTEMS


def _pyplot():
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  return plt


def plot_split_sweep(preds: list[pm.Prediction], path: str, title: str) -> None:
  """Step time and per-role busy fraction of ma_sep vs attention devices, other strategies flat."""
  plt = _pyplot()
  n_attn_of = lambda p: int(p.split.split(':')[0])  # noqa: E731
  sweep = sorted((p for p in preds if p.strategy == 'ma_sep'), key=n_attn_of)
  n_attn = [n_attn_of(p) for p in sweep]
  fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=[2, 1])
  ms = [p.step_s * 1e3 for p in sweep]
  ax.plot(n_attn, ms, 'o-', color='C0', label='ma_sep (best M per split)')
  bad = [(a, t) for a, t, p in zip(n_attn, ms, sweep, strict=True) if not p.fits]
  if bad:
    ax.plot(*zip(*bad, strict=True), 'x', color='red', markersize=10, label='does not fit in HBM')
  for i, p in enumerate(
    sorted((p for p in preds if p.strategy != 'ma_sep' and p.fits), key=lambda p: p.step_s)[:4]
  ):
    ax.axhline(p.step_s * 1e3, color=f'C{i + 1}', ls='--', label=f'{p.strategy} {p.split}')
  ax.set_ylabel('predicted step time (ms)' if sweep[0].mode == 'train' else 'predicted TPOT (ms)')
  ax.set_yscale('log')
  ax.set_title(title)
  ax.grid(True, which='both', alpha=0.3)
  ax.legend(fontsize=8)
  ax2.plot(n_attn, [p.busy['attention'] for p in sweep], 's-', label='attention devices')
  ax2.plot(n_attn, [p.busy['experts'] for p in sweep], '^-', label='expert devices')
  ax2.set_xlabel('attention devices (the rest hold the experts)')
  ax2.set_ylabel('busy (compute) fraction')
  ax2.set_ylim(0, 1.05)
  ax2.set_xticks(n_attn)
  ax2.grid(True, alpha=0.3)
  ax2.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_afd_roofline(path: str) -> None:
  """AFD HFU bound vs FFN nodes: link ceiling (Eq. 19) and the HBM roofline at intensity I."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(8, 5))
  nodes = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
  for i, key in enumerate(
    ['DeepSeek-V3 / H800', 'DeepSeek-V3 / GB200', 'Step3 / H800', 'seed / A100, HDR per node']
  ):
    s = SYSTEMS[key]
    t_b = afd.afd_budget(s)
    r = [afd.afd_roofline(s, n, t_b) for n in nodes]
    ax.plot(nodes, [100 * x['hfu'] for x in r], 'o-', color=f'C{i}', label=f'{key}: HFU bound')
    ax.plot(
      nodes,
      [100 * min(x['hfu_comm'], 1.5) for x in r],
      ':',
      color=f'C{i}',
      label=f'{key}: link ceiling (Eq. 19)',
    )
  ax.axhline(60, color='grey', ls='--', label='large-scale EP reference (~60 %)')
  ax.set_xscale('log')
  ax.set_xticks(nodes, [str(n) for n in nodes])
  ax.set_xlabel('FFN nodes N_F')
  ax.set_ylabel('FFN HFU bound (%)')
  ax.set_ylim(0, 150)
  ax.set_title('AFD roofline: SLO 50 ms, L_accept 1.7, t_g 15 ms, 3BO (link ceiling capped 150 %)')
  ax.grid(True, which='both', alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The AFD paper.
