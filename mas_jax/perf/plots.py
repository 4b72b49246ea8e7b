"""Plots of the planner (matplotlib, Agg backend: files only).

Every plot draws a strategy in its colour of STRATEGY_COLORS; red is kept for what does not fit.
"""

from __future__ import annotations

from mas_jax import perf as pm
from mas_jax.perf import afd
from mas_jax.perf.afd import SYSTEMS

# One colour per strategy in every plot (matplotlib's tab10 blue, orange, green, purple).
STRATEGY_COLORS = {
  'ma_sep': '#1f77b4',
  'tp_pp': '#ff7f0e',
  'ep': '#2ca02c',
  'dp': '#9467bd',
}
NOT_FIT_COLOR = '#d62728'  # red: placements that do not fit in HBM
SEED_SPLIT = '12:4'  # the seed paper's ma_sep split (configs/paper.py)


def _pyplot():
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  return plt


def _ms(p: pm.Prediction) -> str:
  ms = p.step_s * 1e3
  return f'{ms:,.0f} ms' if ms >= 100 else f'{ms:.3g} ms'


def plot_split_sweep(
  preds: list[pm.Prediction], path: str, title: str, seed_split: str = SEED_SPLIT
) -> None:
  """ma_sep's step time and per-role busy fraction at each attention:expert split (its best M),
  the best placement of every other strategy as a flat line.

  Marks the best split that fits and the seed's split, writes M (micro-batches) and the
  gradient-accumulation chunks wherever they change along the sweep, and draws splits that do
  not fit in HBM as red x.
  """
  plt = _pyplot()
  from matplotlib.lines import Line2D
  from matplotlib.ticker import FuncFormatter

  n_attn_of = lambda p: int(p.split.split(':')[0])  # noqa: E731
  sweep = sorted((p for p in preds if p.strategy == 'ma_sep'), key=n_attn_of)
  if not sweep:
    raise ValueError('no ma_sep prediction to sweep')
  xs = [n_attn_of(p) for p in sweep]
  ms = [p.step_s * 1e3 for p in sweep]
  train = sweep[0].mode == 'train'
  color = STRATEGY_COLORS['ma_sep']
  fig, (ax, ax2) = plt.subplots(
    2, 1, figsize=(11, 7.5), sharex=True, height_ratios=[2.2, 1], layout='constrained'
  )

  # ma_sep: one line through every split; fitting splits as dots, the others as red x.
  ax.plot(xs, ms, '-', color=color, lw=1.5, zorder=2)
  fit = [(x, t) for x, t, p in zip(xs, ms, sweep, strict=True) if p.fits]
  bad = [(x, t) for x, t, p in zip(xs, ms, sweep, strict=True) if not p.fits]
  if fit:
    ax.plot(
      *zip(*fit, strict=True),
      'o',
      color=color,
      ms=7,
      zorder=3,
      label='ma_sep (each split at its best M)',
    )
  if bad:
    ax.plot(
      *zip(*bad, strict=True),
      'x',
      color=NOT_FIT_COLOR,
      ms=11,
      mew=2.5,
      zorder=4,
      label='ma_sep split that does not fit in HBM',
    )

  # M and accumulation where they change along the sweep (and at the first split).
  last = None
  for x, t, p in zip(xs, ms, sweep, strict=True):
    now = (p.microbatches, p.accumulation)
    if now != last:
      ax.annotate(
        f'M={p.microbatches}' + (f'\naccum {p.accumulation}' if train else ''),
        (x, t),
        xytext=(0, -16),
        textcoords='offset points',
        ha='center',
        va='top',
        fontsize=8,
        color='dimgray',
        bbox={'boxstyle': 'round,pad=0.2', 'fc': 'white', 'ec': 'none', 'alpha': 0.85},
        zorder=6,
      )
    last = now

  # The best split that fits, and the seed's split.
  fitting = [p for p in sweep if p.fits]
  best = min(fitting, key=lambda p: p.step_s) if fitting else None
  if best is not None:
    x = n_attn_of(best)
    ax.plot(x, best.step_s * 1e3, '*', color='gold', mec='black', ms=20, zorder=5)
    ax.annotate(
      f'best split {best.split}'
      + (" (the seed's)" if best.split == seed_split else '')
      + f'\n{_ms(best)}',
      (x, best.step_s * 1e3),
      xytext=(12, 14),
      textcoords='offset points',
      fontsize=9,
      fontweight='bold',
      arrowprops={'arrowstyle': '-', 'color': 'black', 'lw': 0.8},
    )
  seed = next((p for p in sweep if p.split == seed_split), None)
  if seed is not None and seed is not best:
    x = n_attn_of(seed)
    ax.plot(x, seed.step_s * 1e3, 'D', mfc='none', mec='black', ms=14, mew=1.8, zorder=5)
    fits = '' if seed.fits else ', does not fit'
    ax.annotate(
      f"seed's split {seed.split}\n{_ms(seed)}{fits}",
      (x, seed.step_s * 1e3),
      xytext=(12, 14),
      textcoords='offset points',
      fontsize=9,
      arrowprops={'arrowstyle': '-', 'color': 'black', 'lw': 0.8},
    )
  elif seed is None:
    ax.text(
      0.01,
      0.02,
      f"seed's split {seed_split}: not a valid split here",
      transform=ax.transAxes,
      fontsize=8,
      color='dimgray',
    )

  # Every other strategy: its fastest placement that fits, as a flat line in its colour.
  for strategy in ('tp_pp', 'ep', 'dp'):
    others = [p for p in preds if p.strategy == strategy and p.fits]
    if others:
      p = min(others, key=lambda p: p.step_s)
      ax.axhline(
        p.step_s * 1e3,
        color=STRATEGY_COLORS[strategy],
        ls='--',
        lw=1.8,
        label=f'best {strategy}: {p.split}, M={p.microbatches}'
        + (f', accum {p.accumulation}' if train else '')
        + f' ({_ms(p)})',
      )
  ax.set_ylabel('predicted training step (ms)' if train else 'predicted time per token (ms)')
  ax.set_yscale('log')
  plain = FuncFormatter(lambda v, _: f'{v:,.0f}' if v >= 10 else f'{v:g}')
  ax.yaxis.set_major_formatter(plain)
  # Minor ticks labelled at 2, 3 and 5 of each decade only.
  ax.yaxis.set_minor_formatter(
    FuncFormatter(lambda v, _: plain(v) if f'{v:.0e}'[0] in '235' else '')
  )
  ax.tick_params(axis='y', which='minor', labelsize=7)
  ax.set_title(title)
  ax.grid(True, which='both', alpha=0.3)
  handles, _ = ax.get_legend_handles_labels()
  words = 'M: micro-batches in flight' + ('\naccum: gradient-accumulation chunks' if train else '')
  handles.append(Line2D([], [], ls='', label=words))
  ax.legend(
    handles=handles, fontsize=8, loc='upper left', bbox_to_anchor=(1.01, 1.0), borderaxespad=0
  )
  ax.margins(y=0.25)

  ax2.plot(
    xs,
    [100 * p.busy['attention'] for p in sweep],
    's-',
    color=color,
    label='attention devices',
  )
  ax2.plot(
    xs,
    [100 * p.busy['experts'] for p in sweep],
    '^--',
    color=color,
    mfc='white',
    label='expert devices',
  )
  ax2.set_xlabel('split: attention devices : expert devices')
  ax2.set_ylabel('computing (% of step)')
  ax2.set_ylim(0, 105)
  ax2.set_xticks(xs, [p.split for p in sweep])
  ax2.grid(True, alpha=0.3)
  ax2.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
  fig.savefig(path, dpi=110)
  plt.close(fig)


# The systems of the AFD roofline plot: (colour, marker, line style). Not strategy colours.
_AFD_SYSTEMS = {
  'DeepSeek-V3 / H800': ('#17becf', 'o', '-'),
  'DeepSeek-V3 / GB200': ('#8c564b', 's', '--'),
  'Step3 / H800': ('#e377c2', '^', '-.'),
  'seed / A100, HDR per node': ('black', 'D', ':'),
}
AFD_NODES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def dead_zone_start(systems=tuple(_AFD_SYSTEMS), nodes=AFD_NODES) -> int:
  """FFN nodes past which no plotted system's utilisation bound rises any more: the largest,
  over the systems, of the node count where its bound peaks (the first one, on a plateau)."""
  start = nodes[0]
  for key in systems:
    s = SYSTEMS[key]
    t_b = afd.afd_budget(s)
    hfu = [afd.afd_roofline(s, n, t_b)['hfu'] for n in nodes]
    peak = max(hfu)
    start = max(start, next(n for n, h in zip(nodes, hfu, strict=True) if h >= peak - 1e-9))
  return start


def plot_afd_roofline(path: str) -> None:
  """The AFD paper's bound on FFN-GPU utilisation vs FFN nodes: the lower of the network-link
  ceiling (Eq. 19) and the HBM roofline at the intensity the link can feed, one line per system;
  the dead zone, where more FFN nodes cannot raise the bound, shaded."""
  plt = _pyplot()
  from matplotlib.lines import Line2D
  from matplotlib.patches import Patch

  fig, ax = plt.subplots(figsize=(11, 5.8), layout='constrained')
  nodes = list(AFD_NODES)
  start = dead_zone_start()
  ax.axvspan(start, nodes[-1] * 1.3, color='#fde0dd', zorder=0)
  ax.text(
    (start * nodes[-1] * 1.3) ** 0.5,
    97,
    'DEAD ZONE\nadding FFN nodes here cannot raise utilisation\n'
    '(the network link, not the GPUs, sets the limit)',
    ha='center',
    va='top',
    fontsize=9,
    color='#a50f15',
  )
  handles = []
  sizes = iter([11, 9, 8, 6])  # later systems drawn smaller, so coinciding points stay visible
  for key, (color, marker, ls) in _AFD_SYSTEMS.items():
    s = SYSTEMS[key]
    t_b = afd.afd_budget(s)
    r = [afd.afd_roofline(s, n, t_b) for n in nodes]
    hfu = [100 * x['hfu'] for x in r]
    size = next(sizes)
    ax.plot(nodes, hfu, ls=ls, color=color, lw=2, zorder=2)
    for n, h, x in zip(nodes, hfu, r, strict=True):
      link = x['hfu_comm'] <= x['hfu_mem']
      ax.plot(n, h, marker, color=color, ms=size, mfc=color if link else 'white', mew=1.8, zorder=3)
    handles.append(Line2D([], [], color=color, ls=ls, lw=2, marker=marker, ms=size, label=key))
  ep = STRATEGY_COLORS['ep']
  ax.axhline(60, color=ep, ls=(0, (6, 3)), lw=1.5, zorder=1)
  handles += [
    Line2D(
      [], [], color=ep, ls=(0, (6, 3)), lw=1.5, label='large expert-parallel runs reach ~60 %'
    ),
    Line2D(
      [], [], ls='', marker='o', color='gray', mfc='gray', label='filled: network link limits'
    ),
    Line2D(
      [], [], ls='', marker='o', color='gray', mfc='white', label='hollow: HBM bandwidth limits'
    ),
    Patch(color='#fde0dd', label='dead zone'),
  ]
  ax.set_xscale('log')
  ax.set_xticks(nodes, [str(n) for n in nodes])
  ax.set_xlim(nodes[0] / 1.15, nodes[-1] * 1.3)
  ax.set_xlabel('FFN nodes (nodes holding the experts)')
  ax.set_ylabel('best possible FFN-GPU utilisation (% of peak FLOP/s)')
  ax.set_ylim(0, 100)
  ax.set_title(
    'How busy can the expert (FFN) GPUs be when attention and experts run on separate nodes?\n'
    'Upper bound per system (AFD paper, arXiv 2602.09721)',
    fontsize=11,
  )
  ax.grid(True, which='both', alpha=0.3)
  ax.legend(
    handles=handles, fontsize=8, loc='upper left', bbox_to_anchor=(1.01, 1.0), borderaxespad=0
  )
  fig.text(
    0.01,
    0.005,
    'Decode budget: 50 ms per token, 1.7 tokens accepted per step, 15 ms gap, 3 micro-batches in '
    'flight. Bound = the lower of what the network link can feed and what HBM bandwidth allows.',
    fontsize=7.5,
    color='dimgray',
  )
  fig.get_layout_engine().set(h_pad=0.25)
  fig.savefig(path, dpi=110)
  plt.close(fig)
