"""Split planner and paper reproductions of the analytic performance model (mas_jax.perf_model).

Rank every strategy and attention:expert split of a config, and write plots:
  python -m mas_jax.plan --config=configs/paper.py --hardware=a100_80g --mode=train --devices=16
  python -m mas_jax.plan --config=configs/paper.py --mode=decode --batch=24 \
    --calibration=docs/benchmarks/calibration.json
Compare the one-device training step with a GPU benchmark's measured train steps:
  python -m mas_jax.plan --config=configs/paper.py --hardware=h100 \
    --calibration=docs/benchmarks/nvidia_h100_80gb_hbm3_calibration.json \
    --measured=docs/benchmarks/nvidia_h100_80gb_hbm3.json
Reproduce the AFD paper's roofline and penalties, or check the seed paper's claims:
  python -m mas_jax.plan --reproduce=afd
  python -m mas_jax.plan --reproduce=seed
The seed's decode table on 16 A100s (roofline) and 16 H100s (with a decode calibration of
bench/decode.py), and the one-GPU decode step predicted vs measured:
  python -m mas_jax.plan --reproduce=decode \
    --calibration=docs/benchmarks/nvidia_h100_80gb_hbm3_decode_calibration.json \
    --measured=docs/benchmarks/nvidia_h100_80gb_hbm3_decode.json
"""

from __future__ import annotations

import dataclasses
import json
import os

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from mas_jax import perf_model as pm

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/paper.py', 'Model config file.')
_HARDWARE = flags.DEFINE_string(
  'hardware', 'a100_80g', f'One of {sorted(pm.HARDWARE)} or a JSON file of figures.'
)
_HW_OVERRIDE = flags.DEFINE_multi_string(
  'hw', [], 'Hardware field override, e.g. --hw=gpus_per_node=4 --hw=scale_out_bw=6.25e9.'
)
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'decode'], 'Workload to predict.')
_DEVICES = flags.DEFINE_integer('devices', 0, 'Devices; 0: attn_devices + moe_devices.')
_BATCH = flags.DEFINE_integer(
  'batch', 0, 'Sequences (train batch / decode concurrency); 0: config.'
)
_CONTEXT = flags.DEFINE_integer('context', 0, 'Decode context length; 0: config seq_len.')
_CALIBRATION = flags.DEFINE_string('calibration', None, 'Calibration JSON of measured timings.')
_PLOT_DIR = flags.DEFINE_string('plot_dir', 'docs/plots', 'Where PNG plots are written.')
_TOP = flags.DEFINE_integer('top', 25, 'Rows of the ranked table.')
_MEASURED = flags.DEFINE_string(
  'measured', None, 'Bench JSON (bench/gpu_bench.py): predicted vs measured train steps.'
)
_REPRODUCE = flags.DEFINE_enum(
  'reproduce',
  None,
  ['afd', 'seed', 'decode'],
  "Print a paper reproduction ('decode': the seed's decode table on A100 and H100).",
)

# The seed's cluster: 4 nodes of 4 A100 80GB, NVLink 3 (600 GB/s total), InfiniBand HDR 200 Gb/s.
SEED_HW = {'gpus_per_node': 4, 'scale_up_bw': 300e9, 'scale_out_bw': 25e9}
# The seed's table: (TP=8 x PP=2, MA Separation 12:4).
SEED_CLAIMS = {
  'tpot_ms': (2.76, 1.82),
  'tps': (8696, 13289),
  'gpu_util': (0.712, 0.897),
  'memory_total_gb': (103.5, 123.7),
}
SEED_DECODE_BATCH = 24  # TPS x TPOT of both claimed rows: ~24 sequences in flight

# AFD paper App. B figures (FP8 TFLOPS, HBM, unidirectional scale-out / scale-up, H800 sustained).
AFD_SYSTEMS = {
  'DeepSeek-V3 / H800': pm.AfdSystem(
    'DeepSeek-V3 / H800', 7168, 2048, 256, 8, 58, 1979e12, 3.35e12, 50e9, 160e9
  ),
  'Step3 / H800': pm.AfdSystem(
    'Step3 / H800', 7168, 5120, 48, 3, 56, 1979e12, 3.35e12, 50e9, 160e9
  ),
  'DeepSeek-V3 / GB200': pm.AfdSystem(
    'DeepSeek-V3 / GB200', 7168, 2048, 256, 8, 58, 4500e12, 7.7e12, 720e9, 720e9
  ),
  'Kimi-K2 / GB200': pm.AfdSystem(
    'Kimi-K2 / GB200', 7168, 2048, 384, 8, 60, 4500e12, 7.7e12, 720e9, 720e9
  ),
  'GLM-4.7 / GB200': pm.AfdSystem(
    'GLM-4.7 / GB200', 5120, 1536, 160, 8, 89, 4500e12, 7.7e12, 720e9, 720e9
  ),
  # The seed model: GELU (2 matrices), bf16 both ways and bf16 weights, 4 A100s per node.
  'seed / A100, HDR per GPU': pm.AfdSystem(
    'seed / A100, HDR per GPU', 4096, 16384, 16, 2, 4, 312e12, 2.039e12, 25e9, 300e9, 4, 2, 2, 2, 2
  ),
  'seed / A100, HDR per node': pm.AfdSystem(
    'seed / A100, HDR per node',
    4096,
    16384,
    16,
    2,
    4,
    312e12,
    2.039e12,
    6.25e9,
    300e9,
    4,
    2,
    2,
    2,
    2,
  ),
}


def table(headers: list[str], rows: list[list]) -> str:
  """A markdown table (it reads in a terminal too)."""
  cells = [[str(c) for c in r] for r in [headers, *rows]]
  widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
  lines = [
    '| ' + ' | '.join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + ' |' for r in cells
  ]
  lines.insert(1, '|' + '|'.join('-' * (w + 2) for w in widths) + '|')
  return '\n'.join(lines)


_ROLE = {'attention': 'A', 'experts': 'F', 'all': 'all'}  # AFD's letters for the two roles


def _roles(d: dict[str, float], fmt: str) -> str:
  return ' / '.join(f'{_ROLE[k]} {v:{fmt}}' for k, v in d.items())


def prediction_row(rank: int, p: pm.Prediction) -> list:
  """One ranked-table row of a prediction."""
  mem = _roles({k: v / 1e9 for k, v in p.memory.items()}, '.1f')
  return [
    rank,
    p.strategy,
    p.split,
    p.microbatches,
    p.accumulation,
    f'{p.step_s * 1e3:.3f}',
    f'{p.tokens_per_s:,.0f}',
    f'{100 * p.mfu:.1f}',
    _roles(p.busy, '.0%'),
    mem,
    'yes' if p.fits else 'NO',
    p.bound,
    ', '.join(p.measured) or '-',
  ]


PRED_HEADERS = [
  '#',
  'strategy',
  'split',
  'M',
  'accum',
  'step ms',
  'tokens/s',
  'MFU %',
  'busy (compute)',
  'memory GB/device',
  'fits',
  'bound by',
  'measured',
]


# ----------------------------------------------------------------------------------------------
# Plots (Agg backend: files only).


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
    s = AFD_SYSTEMS[key]
    t_b = pm.afd_budget(s)
    r = [pm.afd_roofline(s, n, t_b) for n in nodes]
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


def reproduce_afd(plot_dir: str) -> None:
  """Prints the HFU ceilings, dead-zone sweep and imbalance penalties; plots the roofline."""
  print('## AFD HFU ceiling (Eq. 19: HFU = BW_eff * 2 n_mat M / (dispatch + combine bytes) / peak)')
  rows = []
  for key, n_f, paper in [
    ('DeepSeek-V3 / H800', 2, '33.1 %'),
    ('DeepSeek-V3 / H800', 8, ''),
    ('Step3 / H800', 1, ''),
    ('DeepSeek-V3 / GB200', 2, '65.5 %'),
    ('Kimi-K2 / GB200', 2, '65.5 %'),
    ('GLM-4.7 / GB200', 2, 'lower'),
    ('seed / A100, HDR per GPU', 1, ''),
    ('seed / A100, HDR per node', 1, ''),
  ]:
    s = AFD_SYSTEMS[key]
    bw = pm.afd_bw_eff(s.scale_out_bw, s.scale_up_bw, s.top_k, n_f)
    hfu = pm.afd_hfu_ceiling(
      bw, s.ffn_hidden, s.peak_flops, s.n_mat, s.dispatch_bytes, s.combine_bytes
    )
    rows.append(
      [
        key,
        n_f,
        pm.afd_regime(s, n_f),
        f'{bw / 1e9:.1f}',
        s.ffn_hidden,
        f'{100 * hfu:.1f} %',
        paper,
      ]
    )
  print(table(['system', 'N_F nodes', 'regime', 'BW_eff GB/s', 'M', 'HFU ceiling', 'paper'], rows))

  s = AFD_SYSTEMS['DeepSeek-V3 / H800']
  t_b = pm.afd_budget(s)
  print(
    f'\n## Dead zone: {s.name}, t_B = {t_b * 1e6:.0f} us (SLO 50 ms, L_accept 1.7, '
    't_g 15 ms, 3BO, 58 MoE layers)'
  )
  rows = []
  for n_f in [1, 2, 3, 4, 8, 16, 32]:
    r = pm.afd_roofline(s, n_f, t_b)
    rows.append(
      [
        n_f,
        r['regime'],
        f'{r["bw_eff"] / 1e9:.0f}',
        f'{r["b_rank"]:,.0f}',
        r['local_experts'],
        f'{r["intensity"]:.0f}',
        f'{100 * r["hfu_comm"]:.1f}',
        f'{100 * r["hfu_mem"]:.1f}',
        f'{100 * r["hfu"]:.1f}',
      ]
    )
  print(
    table(
      [
        'N_F',
        'regime',
        'BW_eff GB/s',
        'B_rank tokens',
        'local experts',
        'I FLOP/B',
        'link HFU %',
        'HBM HFU %',
        'HFU bound %',
      ],
      rows,
    )
  )
  print(
    'Adding FFN nodes past the scale-up-bound region lowers the link ceiling (10.3 % once\n'
    'N_F >= TopK) while intensity rises: HFU cannot grow - the dead zone.'
  )

  print('\n## Imbalance penalty alpha (EP: lambda_EP = t_a / t_f = 4; AFD: corrected Eq. 14-15)')
  rows = []
  for n_a, n_f in [(3, 1), (12, 4), (8, 2), (10, 2), (20, 4), (24, 6)]:
    for sigma in (0.7, 0.8, 0.85):
      rows.append(
        [
          f'{n_a}:{n_f}',
          sigma,
          f'{pm.alpha_ep(4, sigma):.3f}',
          f'{pm.alpha_afd_exact(sigma, n_a, n_f):.3f}',
          f'{pm.alpha_afd_discrete(sigma, n_a, n_f):.3f}',
          f'{pm.alpha_afd_as_printed(sigma, n_a, n_f):.3f}',
        ]
      )
  print(
    table(
      [
        'N_A:N_F',
        'sigma',
        'alpha_EP',
        'alpha_AFD exact (Eq.13)',
        'alpha_AFD discrete (corrected)',
        'as printed (typo)',
      ],
      rows,
    )
  )
  path = os.path.join(plot_dir, 'afd_roofline.png')
  plot_afd_roofline(path)
  print(f'\nwrote {path}')


# ----------------------------------------------------------------------------------------------
# The seed paper.


def _seed_predictions(m: pm.ModelSpec, hw: pm.Hardware, cal):
  decode = pm.Workload('decode', SEED_DECODE_BATCH, m.seq_len)
  train = pm.Workload('train', m.batch_size, m.seq_len)
  return {
    'decode_tp_pp': pm.predict_tp_pp(m, hw, decode, 8, 2, 1, cal),
    'decode_ma_sep': pm.best_ma_sep(m, hw, decode, 12, 4, cal),
    'train_tp_pp': pm.predict_tp_pp(m, hw, train, 8, 2, 4, cal),
    'train_ma_sep': pm.best_ma_sep(m, hw, train, 12, 4, cal),
    'decode_plan': pm.plan(m, hw, decode, 16, cal),
    'train_plan': pm.plan(m, hw, train, 16, cal),
  }


def _mean_busy(p: pm.Prediction) -> float:
  """Device-weighted mean busy fraction."""
  if p.strategy != 'ma_sep':
    return p.busy['all']
  a, f = (int(x) for x in p.split.split(':'))
  return (a * p.busy['attention'] + f * p.busy['experts']) / (a + f)


def reproduce_seed(m: pm.ModelSpec, cal) -> None:
  """Predicts the seed's two rows on its cluster and says which of its numbers can be true."""
  for label, nic in [('HDR port per GPU (25 GB/s)', 25e9), ('one HDR port per node', 6.25e9)]:
    hw = pm.load_hardware('a100_80g', {**SEED_HW, 'scale_out_bw': nic})
    r = _seed_predictions(m, hw, cal)
    tp, ma = r['decode_tp_pp'], r['decode_ma_sep']
    ttp, tma = r['train_tp_pp'], r['train_ma_sep']
    gb = lambda p: max(p.memory.values()) / 1e9  # noqa: E731
    static = lambda p: max(v[0] for v in p.memory_parts.values()) / 1e9  # noqa: E731
    c = SEED_CLAIMS
    print(f'## Seed claims vs prediction: 16 x A100 80GB, 4 per node, NVLink 600 GB/s, {label}')
    print(
      f'Decode: {SEED_DECODE_BATCH} sequences at context {m.seq_len}; training: batch '
      f'{m.batch_size} x {m.seq_len}. Predictions are roofline floors at datasheet peaks.'
    )
    rows = [
      [
        'TPOT (ms)',
        c['tpot_ms'][0],
        f'{tp.step_s * 1e3:.2f}',
        c['tpot_ms'][1],
        f'{ma.step_s * 1e3:.2f} (M={ma.microbatches})',
      ],
      [
        'TPS (tokens/s)',
        f'{c["tps"][0]:,}',
        f'{tp.tokens_per_s:,.0f}',
        f'{c["tps"][1]:,}',
        f'{ma.tokens_per_s:,.0f}',
      ],
      [
        'TPS x TPOT (sequences)',
        f'{c["tps"][0] * c["tpot_ms"][0] / 1e3:.1f}',
        SEED_DECODE_BATCH,
        f'{c["tps"][1] * c["tpot_ms"][1] / 1e3:.1f}',
        SEED_DECODE_BATCH,
      ],
      [
        'GPU utilisation / busy (decode)',
        f'{c["gpu_util"][0]:.1%}',
        f'{_mean_busy(tp):.1%}',
        f'{c["gpu_util"][1]:.1%}',
        f'{_mean_busy(ma):.1%} (attn {ma.busy["attention"]:.0%}, exp {ma.busy["experts"]:.0%})',
      ],
      [
        'MFU (decode)',
        f'{c["tps"][0] * tp.mfu / tp.tokens_per_s:.2%}',
        f'{tp.mfu:.2%}',
        f'{c["tps"][1] * ma.mfu / ma.tokens_per_s:.2%}',
        f'{ma.mfu:.2%}',
      ],
      ['memory GB/GPU (decode)', '-', f'{gb(tp):.1f}', '-', f'{gb(ma):.1f}'],
      [
        'memory GB/GPU (train: states + act.)',
        c['memory_total_gb'][0],
        f'{gb(ttp):.1f} ({static(ttp):.1f} + act., accum {ttp.accumulation})',
        c['memory_total_gb'][1],
        f'{gb(tma):.1f} ({static(tma):.1f} + act., accum {tma.accumulation})',
      ],
      [
        'training tokens/s (MFU)',
        '-',
        f'{ttp.tokens_per_s:,.0f} ({ttp.mfu:.1%})',
        '-',
        f'{tma.tokens_per_s:,.0f} ({tma.mfu:.1%})',
      ],
      ['training bound by', '-', ttp.bound, '-', tma.bound],
    ]
    print(
      table(
        ['metric', 'claimed TP8xPP2', 'predicted TP8xPP2', 'claimed 12:4', 'predicted 12:4'], rows
      )
    )
    for mode in ('train', 'decode'):
      best = r[f'{mode}_plan'][0]
      best_ma = next(p for p in r[f'{mode}_plan'] if p.strategy == 'ma_sep')
      print(
        f'best for {mode}: {best.strategy} {best.split} ({best.step_s * 1e3:.2f} ms); '
        f'best ma_sep split: {best_ma.split}, M={best_ma.microbatches} '
        f'({best_ma.step_s * 1e3:.2f} ms)'
      )
    print()
  _seed_verdicts(m, pm.load_hardware('a100_80g', SEED_HW), r)


def _seed_verdicts(m: pm.ModelSpec, hw: pm.Hardware, r) -> None:
  """Which seed numbers are physically possible, from first principles."""
  c, b, ctx = SEED_CLAIMS, SEED_DECODE_BATCH, m.seq_len
  active = pm.expected_active(m.num_experts / 4, b, m)
  stream = m.num_layers * active * pm.expert_params(m) * m.act_bytes
  need = stream / (c['tpot_ms'][1] * 1e-3)
  tp_floor = r['decode_tp_pp'].step_s * 1e3
  flops_tok = pm.forward_flops_per_token(m, ctx, causal=False)
  mfu_tps = 0.897 * 16 * hw.bf16_flops / flops_tok
  train_days = 50_000 * m.batch_size * m.seq_len / c['tps'][1] / 86400
  ratio = r['decode_ma_sep'].tokens_per_s / r['decode_tp_pp'].tokens_per_s
  print('## Which seed numbers are physically possible (HDR port per node for the rows above)')
  print(
    f'- 12:4 TPOT 1.82 ms: each expert GPU streams {active:.2f} active experts x '
    f'{m.num_layers} layers = {stream / 1e9:.2f} GB per step; in 1.82 ms that needs '
    f'{need / 1e12:.2f} TB/s = {need / hw.hbm_bw:.0%} of A100 HBM. IMPOSSIBLE in bf16.'
  )
  print(
    f'- TP8xPP2 TPOT 2.76 ms: floor {tp_floor:.2f} ms, so 2.76 ms is {tp_floor / 2.76:.0%} '
    'of ideal. POSSIBLE.'
  )
  print(
    f'- TPS x TPOT = {c["tps"][0] * 2.76e-3:.1f} and {c["tps"][1] * 1.82e-3:.1f}: a fixed '
    'concurrency of ~24 sequences; the ratios are self-consistent.'
  )
  print(
    f'- GPU utilisation 89.7 %: as FLOP utilisation it would take {mfu_tps:,.0f} decode '
    'tokens/s; it can only be busy time (nvidia-smi style). Predicted busy time of 12:4 '
    f'decode: {_mean_busy(r["decode_ma_sep"]):.0%}.'
  )
  print(
    f'- Memory {c["memory_total_gb"][0]} GB and {c["memory_total_gb"][1]} GB per GPU exceed '
    'the 80 GB of an A100 80GB. IMPOSSIBLE as stated.'
  )
  print(
    f'- Training 50K steps of {m.batch_size} x {m.seq_len} tokens at 13,289 tokens/s takes '
    f'{train_days:.0f} days; predicted 12:4 training: '
    f'{r["train_ma_sep"].tokens_per_s:,.0f} tokens/s.'
  )
  print(
    f'- Claimed 12:4 / TP8xPP2 TPS ratio 1.53; predicted {ratio:.2f}: the baseline should win '
    f'at {b} sequences.'
  )


# ----------------------------------------------------------------------------------------------
# The seed's decode table.

DECODE_BATCHES = (24, 256)


def decode_hardware(cal) -> list[tuple[str, pm.Hardware, pm.Calibration | None]]:
  """The 16-GPU machines of the decode table: the seed's A100 cluster read two ways (roofline at
  datasheet peaks), the H100 preset (2 nodes of 8) at datasheet peaks and, with a calibration,
  with its measured rates and kernel timings."""
  a100 = pm.load_hardware('a100_80g', SEED_HW)
  out = [
    ('16 x A100, 4/node, HDR per GPU (roofline)', a100, None),
    (
      '16 x A100, 4/node, HDR per node (roofline)',
      dataclasses.replace(a100, scale_out_bw=6.25e9),
      None,
    ),
    ('16 x H100, 8/node (roofline)', pm.HARDWARE['h100'], None),
  ]
  if cal:
    hw, _ = cal.apply(pm.HARDWARE['h100'], 'bfloat16')
    out.append((f'16 x H100, 8/node, calibrated ({cal.device})', hw, cal))
  return out


def decode_predictions(m: pm.ModelSpec, hw, cal, batch: int, context: int) -> list:
  """(label, prediction) of TP8xPP2 (M=1 and its best M), ma_sep 12:4 (best M), the best ma_sep
  split and the best placement of all, for `batch` sequences at `context`."""
  w = pm.Workload('decode', batch, context)
  preds = pm.plan(m, hw, w, 16, cal)
  tp_best = next(p for p in preds if p.strategy == 'tp_pp' and p.split == 'tp8xpp2')
  return [
    ('TP8xPP2, one micro-batch', pm.predict_tp_pp(m, hw, w, 8, 2, 1, cal)),
    ('TP8xPP2, best M', tp_best),
    ('ma_sep 12:4, best M', pm.best_ma_sep(m, hw, w, 12, 4, cal)),
    ('ma_sep, best split', next(p for p in preds if p.strategy == 'ma_sep')),
    ('best of all', preds[0]),
  ]


def reproduce_decode(m: pm.ModelSpec, cal, context: int, measured: str | None) -> None:
  """Prints the seed's decode claims beside the planner's predictions, and with `measured` (a
  bench/decode.py result) the one-GPU reference decode step predicted vs measured."""
  c = SEED_CLAIMS
  print(
    f"## The seed's decode claims: 16 x A100, {SEED_DECODE_BATCH} sequences (TPS x TPOT), "
    f'context {context}'
  )
  print(
    table(
      ['placement', 'TPOT ms', 'TPS (tokens/s)'],
      [
        ['TP8xPP2', c['tpot_ms'][0], f'{c["tps"][0]:,}'],
        ['MA Separation 12:4', c['tpot_ms'][1], f'{c["tps"][1]:,}'],
      ],
    )
  )
  rows = []
  for label, hw, kcal in decode_hardware(cal):
    for batch in DECODE_BATCHES:
      for name, p in decode_predictions(m, hw, kcal, batch, context):
        rows.append(
          [
            label,
            batch,
            name,
            f'{p.strategy} {p.split}',
            p.microbatches,
            f'{p.step_s * 1e3:.3f}',
            f'{p.tokens_per_s:,.0f}',
            'yes' if p.fits else 'NO',
            p.bound,
            ', '.join(p.measured) or '-',
          ]
        )
  print(f'\n## Predicted decode step (TPOT) and tokens/s, context {context}')
  headers = ['hardware', 'batch', 'row', 'placement', 'M', 'TPOT ms', 'TPS', 'fits', 'bound by']
  print(table([*headers, 'measured terms'], rows))
  if measured:
    compare_decode(m, cal, context, measured)


def compare_decode(m: pm.ModelSpec, cal, context: int, bench_path: str) -> list[list]:
  """The one-GPU reference decode step (dp1) predicted with the calibration vs bench/decode.py's
  measured whole-model TPOT (the decode path's experts)."""
  with open(bench_path) as f:
    bench = json.load(f)
  hw = pm.HARDWARE['h100']
  if cal:
    hw, _ = cal.apply(hw, m.compute_dtype)
  rows = []
  for r in bench.get('model', {}).get('rows', []):
    if 'tpot_s' not in r or r.get('expert_impl', 'auto') != 'auto' or r['context'] != context:
      continue
    p = pm.predict_ep(m, hw, pm.Workload('decode', r['batch'], r['context']), 1, 1, cal)
    rows.append(
      [
        r['batch'],
        f'{p.step_s * 1e3:.3f}',
        f'{r["tpot_s"] * 1e3:.3f}',
        f'{(p.step_s - r["tpot_s"]) / r["tpot_s"]:+.1%}',
        ', '.join(f'{t.name} {t.time_s * 1e3:.3f}' for t in p.terms if t.time_s > 0),
        ', '.join(p.measured) or '-',
      ]
    )
  print(
    f'\n## One-GPU reference decode step: predicted ({hw.name}'
    f'{", calibrated" if cal else ""}) vs measured ({bench.get("device")})'
  )
  headers = ['batch', 'predicted ms', 'measured ms', 'error', 'terms ms', 'measured terms']
  print(table(headers, rows))
  return rows


# ----------------------------------------------------------------------------------------------
# The planner.


def _hardware(dtype: str):
  """Hardware from flags, with calibration applied; returns (hw, calibration, measured names)."""
  overrides = {}
  for item in _HW_OVERRIDE.value:
    key, value = item.split('=', 1)
    overrides[key] = int(value) if key == 'gpus_per_node' else float(value)
  hw = pm.load_hardware(_HARDWARE.value, overrides)
  if not _CALIBRATION.value:
    return hw, None, []
  cal = pm.Calibration.load(_CALIBRATION.value)
  hw, measured = cal.apply(hw, dtype)
  return hw, cal, measured


def run_planner(config) -> None:
  """Prints the ranked strategies and splits of the config, and writes the plots."""
  m = pm.ModelSpec.from_config(config)
  hw, cal, measured = _hardware(m.compute_dtype)
  n = _DEVICES.value or config.parallel.attn_devices + config.parallel.moe_devices
  mode = _MODE.value
  batch = _BATCH.value or m.batch_size
  context = m.seq_len if mode == 'train' else (_CONTEXT.value or m.seq_len)
  accumulation = config.train.get('grad_accum_steps', 1) if mode == 'train' else 1
  w = pm.Workload(mode, batch, context, accumulation)
  print_plan(m, hw, w, n, cal, measured, _PLOT_DIR.value, _TOP.value)


def print_plan(m, hw, w, n, cal=None, measured=(), plot_dir=None, top=25) -> list[pm.Prediction]:
  """Prints the ranked table of every strategy on n devices; plots when plot_dir is given."""
  preds = pm.plan(m, hw, w, n, cal)
  acc = pm.accounting(m)
  print(
    f'# {w.mode} on {n} x {hw.name} ({hw.gpus_per_node} per node): batch {w.batch}, '
    f'context {w.context}'
  )
  print(
    f'model: {acc["params_total"] / 1e9:.2f} B params, {acc["params_active_matmul"] / 1e9:.2f}'
    f' B active matmul params, {acc["flops_train_per_token"] / 1e9:.2f} GFLOP/token training'
  )
  print('measured hardware figures: ' + (', '.join(measured) or 'none (datasheet peaks)'))
  if cal:
    print(
      f'calibration: {cal.device}; the "measured" column names terms taken from it, '
      'the rest are modelled'
    )
  print(table(PRED_HEADERS, [prediction_row(i + 1, p) for i, p in enumerate(preds[:top])]))
  best = preds[0]
  best_ma = next((p for p in preds if p.strategy == 'ma_sep'), None)
  ma = (
    f'best ma_sep split {best_ma.split} (M={best_ma.microbatches})'
    if best_ma
    else f'no ma_sep split on {n} device(s) (it needs 2 or more): no split sweep'
  )
  print(
    f'\nbest: {best.strategy} {best.split}; {ma}; '
    f'step = {"training step" if w.mode == "train" else "TPOT"}; '
    'busy = compute-kernel time / step.'
  )
  if plot_dir:
    os.makedirs(plot_dir, exist_ok=True)
    roof = os.path.join(plot_dir, 'afd_roofline.png')
    plot_afd_roofline(roof)
    written = [roof]
    if best_ma:
      sweep = os.path.join(plot_dir, f'split_sweep_{w.mode}.png')
      title = f'{w.mode}: {n} x {hw.name}, batch {w.batch}, context {w.context}'
      plot_split_sweep(preds, sweep, title)
      written.insert(0, sweep)
    print('wrote ' + ' and '.join(written))
  return preds


def compare_measured(config, hw, cal, bench_path: str) -> list[list]:
  """Prints the one-device (dp1 = reference strategy) training step vs each measured train step.

  Each entry's overrides are applied to the config. The model has no rematerialisation: entries
  with model.remat other than 'none' get a prediction without recomputation and no error.
  """
  with open(bench_path) as f:
    bench = json.load(f)
  rows = []
  for entry in bench.get('train_step', []):
    cd = ml_collections.ConfigDict(config.to_dict())
    for dotted, value in entry['overrides'].items():
      section, field = dotted.split('.')
      cd[section][field] = value
    m = pm.ModelSpec.from_config(cd)
    accumulation = cd.train.get('grad_accum_steps', 1)
    w = pm.Workload('train', m.batch_size, m.seq_len, accumulation)
    p = pm.predict_ep(m, hw, w, 1, 1, cal)
    remat = entry['overrides'].get('model.remat', 'none')
    err = (p.step_s - entry['step_s']) / entry['step_s']
    routing = 'dropless' if m.dropless else 'capacity'
    if cd.model.get('expert_dropout', 0) > 0:
      routing += f', dropout {cd.model.expert_dropout:g}'
    rows.append(
      [
        m.batch_size,
        accumulation,
        routing,
        remat,
        f'{p.step_s * 1e3:.1f}',
        f'{entry["step_s"] * 1e3:.1f}',
        f'{err:+.1%}' if remat == 'none' else 'n/a (no remat model)',
        ', '.join(f'{t.name} {t.time_s * 1e3:.1f}' for t in p.terms if t.time_s > 0),
        ', '.join(p.measured) or '-',
      ]
    )
  print(f'# one-device training step: predicted ({hw.name}) vs measured ({bench.get("device")})')
  headers = [
    'batch',
    'accum',
    'experts',
    'remat',
    'predicted ms',
    'measured ms',
    'error',
    'terms ms',
    'measured terms',
  ]
  print(table(headers, rows))
  return rows


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _REPRODUCE.value == 'afd':
    os.makedirs(_PLOT_DIR.value, exist_ok=True)
    reproduce_afd(_PLOT_DIR.value)
  elif _REPRODUCE.value == 'decode':
    m = pm.ModelSpec.from_config(_CONFIG.value)
    cal = pm.Calibration.load(_CALIBRATION.value) if _CALIBRATION.value else None
    reproduce_decode(m, cal, _CONTEXT.value or m.seq_len, _MEASURED.value)
  elif _REPRODUCE.value == 'seed':
    config = _CONFIG.value
    m = pm.ModelSpec.from_config(config)
    cal = pm.Calibration.load(_CALIBRATION.value) if _CALIBRATION.value else None
    reproduce_seed(m, cal)
  elif _MEASURED.value:
    config = _CONFIG.value
    hw, cal, _ = _hardware(config.model.compute_dtype)
    compare_measured(config, hw, cal, _MEASURED.value)
  else:
    run_planner(_CONFIG.value)


if __name__ == '__main__':
  app.run(main)
