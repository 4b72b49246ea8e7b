"""The paper reproductions: the AFD paper's roofline and penalties, the seed's claims, and the
seed's decode table."""

from __future__ import annotations

import dataclasses
import os

from mas_jax import perf as pm
from mas_jax.perf import afd, ma_sep, plots, tp_pp
from mas_jax.perf.afd import SYSTEMS
from mas_jax.perf.report import compare_decode, table

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
    s = SYSTEMS[key]
    bw = afd.afd_bw_eff(s.scale_out_bw, s.scale_up_bw, s.top_k, n_f)
    hfu = afd.afd_hfu_ceiling(
      bw, s.ffn_hidden, s.peak_flops, s.n_mat, s.dispatch_bytes, s.combine_bytes
    )
    rows.append(
      [
        key,
        n_f,
        afd.afd_regime(s, n_f),
        f'{bw / 1e9:.1f}',
        s.ffn_hidden,
        f'{100 * hfu:.1f} %',
        paper,
      ]
    )
  print(table(['system', 'N_F nodes', 'regime', 'BW_eff GB/s', 'M', 'HFU ceiling', 'paper'], rows))

  s = SYSTEMS['DeepSeek-V3 / H800']
  t_b = afd.afd_budget(s)
  print(
    f'\n## Dead zone: {s.name}, t_B = {t_b * 1e6:.0f} us (SLO 50 ms, L_accept 1.7, '
    't_g 15 ms, 3BO, 58 MoE layers)'
  )
  rows = []
  for n_f in [1, 2, 3, 4, 8, 16, 32]:
    r = afd.afd_roofline(s, n_f, t_b)
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
          f'{afd.alpha_ep(4, sigma):.3f}',
          f'{afd.alpha_afd_exact(sigma, n_a, n_f):.3f}',
          f'{afd.alpha_afd_discrete(sigma, n_a, n_f):.3f}',
          f'{afd.alpha_afd_as_printed(sigma, n_a, n_f):.3f}',
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
  os.makedirs(plot_dir, exist_ok=True)
  path = os.path.join(plot_dir, 'afd_roofline.png')
  plots.plot_afd_roofline(path)
  print(f'\nwrote {path}')


# ----------------------------------------------------------------------------------------------
# The seed paper.


def refusal(m: pm.ModelSpec, hw: pm.Hardware, w: pm.Workload, n_attn: int, n_moe: int) -> str:
  """Why the cost model refuses an ma_sep split at one micro-batch (its ValueError), or ''."""
  try:
    ma_sep.predict(m, hw, w, ma_sep.Split(n_attn, n_moe, 1))
  except ValueError as e:
    return str(e)
  return ''


def _refused(m, hw, w, n_attn: int, n_moe: int) -> str:
  return f'refused ({refusal(m, hw, w, n_attn, n_moe) or "no micro-batch count accepted"})'


def _seed_predictions(m: pm.ModelSpec, hw: pm.Hardware, cal):
  """The seed's two placements (TP8xPP2, ma_sep 12:4; None where the model refuses 12:4) and
  the ranked plans of decode and training on its 16 GPUs."""
  decode = pm.Workload('decode', SEED_DECODE_BATCH, m.seq_len)
  train = pm.Workload('train', m.batch_size, m.seq_len)
  return {
    'decode': decode,
    'train': train,
    'decode_tp_pp': tp_pp.predict(m, hw, decode, 8, 2, 1, cal),
    'decode_ma_sep': pm.best_ma_sep(m, hw, decode, 12, 4, cal),
    'train_tp_pp': tp_pp.predict(m, hw, train, 8, 2, 4, cal),
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


def _gb(p: pm.Prediction) -> float:
  """Memory of the fullest device, GB."""
  return max(p.memory.values()) / 1e9


def _state_gb(p: pm.Prediction) -> float:
  """Parameters and optimizer state of the fullest device, GB."""
  return max(x.state for x in p.memory_by_role.values()) / 1e9


def _or(p: pm.Prediction | None, fmt, missing: str = '-') -> str:
  """fmt(p), or `missing` where the model refused the placement."""
  return missing if p is None else fmt(p)


def reproduce_seed(m: pm.ModelSpec, cal) -> None:
  """Predicts the seed's two rows on its cluster and says which of its numbers can be true."""
  for label, nic in [('HDR port per GPU (25 GB/s)', 25e9), ('one HDR port per node', 6.25e9)]:
    hw = pm.load_hardware('a100_80g', {**SEED_HW, 'scale_out_bw': nic})
    r = _seed_predictions(m, hw, cal)
    tp, ma = r['decode_tp_pp'], r['decode_ma_sep']
    ttp, tma = r['train_tp_pp'], r['train_ma_sep']
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
        _or(
          ma,
          lambda p: f'{p.step_s * 1e3:.2f} (M={p.microbatches})',
          _refused(m, hw, r['decode'], 12, 4),
        ),
      ],
      [
        'TPS (tokens/s)',
        f'{c["tps"][0]:,}',
        f'{tp.tokens_per_s:,.0f}',
        f'{c["tps"][1]:,}',
        _or(ma, lambda p: f'{p.tokens_per_s:,.0f}'),
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
        _or(
          ma,
          lambda p: (
            f'{_mean_busy(p):.1%} (attn {p.busy["attention"]:.0%}, exp {p.busy["experts"]:.0%})'
          ),
        ),
      ],
      [
        'MFU (decode)',
        f'{c["tps"][0] * tp.mfu / tp.tokens_per_s:.2%}',
        f'{tp.mfu:.2%}',
        _or(ma, lambda p: f'{SEED_CLAIMS["tps"][1] * p.mfu / p.tokens_per_s:.2%}'),
        _or(ma, lambda p: f'{p.mfu:.2%}'),
      ],
      ['memory GB/GPU (decode)', '-', f'{_gb(tp):.1f}', '-', _or(ma, lambda p: f'{_gb(p):.1f}')],
      [
        'memory GB/GPU (train: states + rest)',
        c['memory_total_gb'][0],
        f'{_gb(ttp):.1f} ({_state_gb(ttp):.1f} + rest, accum {ttp.accumulation})',
        c['memory_total_gb'][1],
        _or(
          tma,
          lambda p: f'{_gb(p):.1f} ({_state_gb(p):.1f} + rest, accum {p.accumulation})',
          _refused(m, hw, r['train'], 12, 4),
        ),
      ],
      [
        'training tokens/s (MFU)',
        '-',
        f'{ttp.tokens_per_s:,.0f} ({ttp.mfu:.1%})',
        '-',
        _or(tma, lambda p: f'{p.tokens_per_s:,.0f} ({p.mfu:.1%})'),
      ],
      ['training bound by', '-', ttp.bound, '-', _or(tma, lambda p: p.bound)],
    ]
    print(
      table(
        ['metric', 'claimed TP8xPP2', 'predicted TP8xPP2', 'claimed 12:4', 'predicted 12:4'], rows
      )
    )
    print(
      'states = parameters and optimizer state; rest = gradients and saved activations '
      '(per GPU, the largest role).'
    )
    for mode in ('train', 'decode'):
      best = r[f'{mode}_plan'][0]
      best_ma = next((p for p in r[f'{mode}_plan'] if p.strategy == 'ma_sep'), None)
      ma_text = _or(
        best_ma,
        lambda p: f'{p.split}, M={p.microbatches} ({p.step_s * 1e3:.2f} ms)',
        'none accepted (' + refusal(m, hw, r[mode], 12, 4) + ')',
      )
      print(
        f'best for {mode}: {best.strategy} {best.split} ({best.step_s * 1e3:.2f} ms); '
        f'best ma_sep split: {ma_text}'
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
  ma = r['decode_ma_sep']
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
    f'decode: {_or(ma, lambda p: f"{_mean_busy(p):.0%}", "n/a (12:4 refused)")}.'
  )
  print(
    f'- Memory {c["memory_total_gb"][0]} GB and {c["memory_total_gb"][1]} GB per GPU exceed '
    'the 80 GB of an A100 80GB. IMPOSSIBLE as stated.'
  )
  print(
    f'- Training 50K steps of {m.batch_size} x {m.seq_len} tokens at 13,289 tokens/s takes '
    f'{train_days:.0f} days; predicted 12:4 training: '
    f'{_or(r["train_ma_sep"], lambda p: f"{p.tokens_per_s:,.0f} tokens/s", "refused")}.'
  )
  if ma is None:
    verdict = f'predicted: n/a (the model refuses 12:4 at {b} sequences).'
  else:
    ratio = ma.tokens_per_s / r['decode_tp_pp'].tokens_per_s
    winner = 'the baseline' if ratio < 1 else '12:4'
    verdict = f'predicted {ratio:.2f}: {winner} should win at {b} sequences.'
  print(f'- Claimed 12:4 / TP8xPP2 TPS ratio 1.53; {verdict}')


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
  """(label, prediction or None) of TP8xPP2 (M=1 and its best M), ma_sep 12:4 (best M), the best
  ma_sep split and the best placement of all, for `batch` sequences at `context`. None: the model
  refuses every such placement (the row says why)."""
  w = pm.Workload('decode', batch, context)
  preds = pm.plan(m, hw, w, 16, cal)
  tp_best = next((p for p in preds if p.strategy == 'tp_pp' and p.split == 'tp8xpp2'), None)
  return [
    ('TP8xPP2, one micro-batch', tp_pp.predict(m, hw, w, 8, 2, 1, cal)),
    ('TP8xPP2, best M', tp_best),
    ('ma_sep 12:4, best M', pm.best_ma_sep(m, hw, w, 12, 4, cal)),
    ('ma_sep, best split', next((p for p in preds if p.strategy == 'ma_sep'), None)),
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
        if p is None:
          w = pm.Workload('decode', batch, context)
          why = refusal(m, hw, w, 12, 4) or 'no split accepted'
          rows.append([label, batch, name, f'refused: {why}', *['-'] * 6])
          continue
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
