"""Hand-computed checks of the analytic performance model and the planner (no JAX, seconds)."""

import dataclasses
import json
import subprocess
import sys

import pytest

from mas_jax import perf as pm
from mas_jax.perf import afd, ep, ma_sep, planner, report

# The seed model (configs/paper.py), written out so the test does not need ml_collections.
SEED = pm.ModelSpec(
  vocab_size=32000,
  num_layers=4,
  d_model=4096,
  num_heads=32,
  num_experts=16,
  top_k=2,
  expert_hidden=16384,
  seq_len=2048,
  batch_size=1024,
)
A100 = pm.HARDWARE['a100_80g']
SEED_HW = dataclasses.replace(A100, gpus_per_node=4)
DECODE = pm.Workload('decode', 24, 2048)


def test_params_and_flops_by_hand():
  d, f, v = 4096, 16384, 32000
  attn = 4 * d * d + 2 * d
  moe = 16 * 2 * d * f + d * 16
  assert pm.attn_params_per_layer(SEED) == attn == 67_117_056
  assert pm.moe_params_per_layer(SEED) == moe == 2_147_549_184
  assert pm.total_params(SEED) == 4 * (attn + moe) + 2 * v * d + d
  active = 4 * (4 * d * d + d * 16 + 2 * 2 * d * f) + d * v
  assert pm.active_matmul_params(SEED) == active
  # 6 N + 6 L S D: the causal half of PaLM's 12 L S D.
  assert pm.train_flops_per_token(SEED) == pytest.approx(6 * active + 6 * 4 * 2048 * d)
  # Decode at context c attends to all c keys: 2 N + 4 L c D.
  assert pm.forward_flops_per_token(SEED, 1000, causal=False) == pytest.approx(
    2 * active + 4 * 4 * 1000 * d
  )
  layer = pm.layer_flops_per_token(SEED, 2048, causal=True)
  assert layer['moe'] == pytest.approx(2 * 2 * 2 * d * f)  # top-2, two matrices, 2 FLOP/MAC


def test_bytes_by_hand():
  assert pm.kv_bytes_per_token_layer(SEED) == 2 * 4096 * 2
  acc = pm.accounting(SEED)
  assert acc['bytes_moe_weights_per_layer'] == pm.moe_params_per_layer(SEED) * 2
  # Activations: 7 D for attention; D + top_k * 1.25 * (2 D + 2 F) values + fp32 logits for MoE.
  assert pm.attn_act_bytes_per_token(SEED) == 2 * 7 * 4096
  assert pm.moe_act_bytes_per_token(SEED) == 2 * (4096 + 2.5 * (2 * 4096 + 2 * 16384)) + 4 * 16


def test_roofline_and_collectives_by_hand():
  assert pm.roofline(312e12, 1.0, A100, 'bfloat16') == pm.Cost(1.0, 'compute')
  assert pm.roofline(1.0, 2.039e12, A100, 'bfloat16') == pm.Cost(1.0, 'hbm')
  # 8 ranks over 2 nodes of 4: NVLink 2*3/4*1e9/300e9, IB 2*1/2*(1e9/4)/25e9, 4 latencies.
  t, bound, measured = pm.all_reduce(1e9, 8, SEED_HW)
  assert t == pytest.approx(5e-3 + 1e-2 + 3e-5)
  assert bound == 'scale-out' and not measured
  assert pm.all_reduce(1e9, 1, SEED_HW) == pm.Cost(0.0, 'none')
  # All-to-all over 8 ranks, 4 per node: 3/7 of the bytes stay on NVLink.
  c = pm.all_to_all(7e9, 8, SEED_HW)
  assert (c.time_s, c.bound) == (pytest.approx(4e9 / 25e9 + 10e-6), 'scale-out')


def test_routing_probabilities():
  assert pm.expected_active(16, 24, SEED) == pytest.approx(16 * (1 - (14 / 16) ** 24))
  # Two of 16 experts hitting a device of 4: 1 - (12/16)(11/15) = 0.45; 4 devices -> 1.8.
  assert pm.hit_probability(4, SEED) == pytest.approx(0.45)


@pytest.mark.parametrize(
  'layers,m,expected',
  [
    # One micro-batch: the attention of layer l waits for the MoE of layer l - 1, so the roles
    # take turns: two ticks per layer, one role idle in each.
    (4, 1, 8),
    (1, 1, 2),
    # M >= 2: while the experts run (l, j) the attention runs the next item, so after the first
    # tick (attention alone) the roles overlap; the last tick is the MoE alone: L * M + 1.
    (4, 2, 9),
    (4, 4, 17),
    (2, 3, 7),
    (1, 4, 5),
  ],
)
def test_ma_sep_schedule_ticks(layers, m, expected):
  ticks = ma_sep.schedule(layers, m)
  assert len(ticks) == expected
  items = [(layer, j) for layer in range(layers) for j in range(m)]
  attn = {t.attn: i for i, t in enumerate(ticks) if t.attn}
  moe = {t.moe: i for i, t in enumerate(ticks) if t.moe}
  # Every item runs once on each role, in order; its MoE after its attention, and the attention
  # of (l, j) after the MoE of (l - 1, j), each in an earlier tick.
  assert list(attn) == items and list(moe) == items
  for layer, j in items:
    assert moe[layer, j] > attn[layer, j]
    if layer:
      assert attn[layer, j] > moe[layer - 1, j]
  assert ticks[0].moe is None and ticks[-1].attn is None
  both = sum(1 for t in ticks if t.attn and t.moe)
  assert both == (0 if m == 1 else layers * m - 1)


def test_afd_ceilings():
  h800 = afd.afd_bw_eff(50e9, 160e9, top_k=8, n_f_nodes=2)
  assert h800 == 160e9  # scale-up bound: 8/2 * 50 > 160
  assert round(100 * afd.afd_hfu_ceiling(h800, 2048, 1979e12), 1) == 33.1
  assert round(100 * afd.afd_hfu_ceiling(50e9, 2048, 1979e12), 1) == 10.3
  assert round(100 * afd.afd_hfu_ceiling(720e9, 2048, 4500e12), 1) == 65.5
  # GELU with bf16 both ways: HFU = BW * M / peak.
  assert afd.afd_hfu_ceiling(12.5e9, 16384, 312e12, 2, 2, 2) == pytest.approx(
    12.5e9 * 16384 / 312e12
  )
  # DeepSeek-V3 / H800 past N_F = TopK = 8: every FFN rank is fed by its own NIC (50 GB/s), so
  # the link ceiling is the 10.3 % above however many nodes are added (the dead zone).
  s = afd.SYSTEMS['DeepSeek-V3 / H800']
  t_b = afd.afd_budget(s)
  assert t_b == pytest.approx((0.05 * 1.7 - 0.015) / (58 * 3))
  for n_f in (8, 16, 32):
    r = afd.afd_roofline(s, n_f, t_b)
    assert r['hfu'] == pytest.approx(afd.afd_hfu_ceiling(50e9, 2048, 1979e12))


def test_corrected_alpha():
  assert afd.alpha_afd_exact(0.8, 3, 1) == pytest.approx(0.8 * 4 / 3.4)
  assert afd.alpha_afd_discrete(0.8, 3, 1) == pytest.approx(4 / 3 * 2 / 3)  # 0.889
  assert afd.alpha_afd_discrete(0.8, 12, 4) == pytest.approx(16 / 12 * 9 / 13)  # 0.923
  assert afd.alpha_afd_as_printed(0.8, 3, 1) == pytest.approx(8 / 3)  # the typo exceeds 1
  for sigma in (0.7, 0.75, 0.8, 0.85):
    assert afd.alpha_afd_discrete(sigma, 3, 1) <= afd.alpha_afd_exact(sigma, 3, 1) <= 1
  assert afd.alpha_ep(4, 0.8) == pytest.approx(5 / 5.25)


def test_seed_decode_12_4_cannot_reach_claim():
  """The seed claims 1.82 ms TPOT for ma_sep 12:4 decode of 24 sequences on 16 A100s."""
  p = pm.best_ma_sep(SEED, SEED_HW, DECODE, 12, 4)
  # Floor: the expert devices run the MoE of every (layer, micro-batch) item one after another,
  # and each item streams the experts of the device's 4 that its tokens routed to. With M
  # micro-batches that is M * expected_active(4, 24 / M) >= expected_active(4, 24) experts per
  # layer (splitting the tokens cannot touch fewer experts in total), so whatever M the planner
  # picks, the experts term alone streams at least the one-batch bytes through HBM.
  stream = pm.expected_active(4, 24, SEED) * pm.expert_params(SEED) * 2 / A100.hbm_bw
  assert p.step_s >= p.time('experts') >= 4 * stream > 1.82e-3
  assert p.tokens_per_s == pytest.approx(24 / p.step_s)
  # An attention device reads 3 head slots' weights and KV cache per item (~88 MB), an expert
  # device ~1 GB of experts: attention is busy for well under a fifth of the step, the experts
  # for most of it (both also run the 262 MB output head of every token).
  assert p.busy['attention'] < 0.2 < p.busy['experts']
  assert p.fits


def test_planner_moe_heavy_training_picks_the_most_expert_devices():
  """A model whose experts cost ~9x its attention per token: the planner gives the experts as
  many devices as ma_sep accepts."""
  heavy = dataclasses.replace(
    SEED,
    num_experts=64,
    expert_hidden=32768,
    num_heads=16,
    batch_size=64,
    seq_len=1024,
    vocab_size=1024,
  )
  hw = dataclasses.replace(pm.HARDWARE['h100'], hbm_bytes=1e13)  # memory is not the question
  w = pm.Workload('train', 64, 1024)
  # 64 experts divide over 1, 2, 4 or 8 expert devices: the splits 15:1, 14:2, 12:4 and 8:8.
  assert planner.ma_sep_splits(heavy, w, 16) == [8, 12, 14, 15]
  preds = pm.plan(heavy, hw, w, 16)
  splits = {p.split: p for p in preds if p.strategy == 'ma_sep'}
  best = next(p for p in preds if p.strategy == 'ma_sep')
  assert best.split == '8:8' and best.accumulation == 1
  # The experts term is compute-bound and the same for every M: L x 4 passes (forward, and in
  # each tick's backward the recomputed forward and twice for the backward) x the step's
  # capacity-padded pairs over F devices x 2 n_mat D H FLOPs.
  pairs = 64 * 1024 * 2 * 1.25
  for f in (1, 2, 4, 8):
    expected = 4 * 4 * pairs / f * 2 * 2 * 4096 * 32768 / hw.bf16_flops
    assert splits[f'{16 - f}:{f}'].time('experts') == pytest.approx(expected)
  # Every tick takes at least its MoE, and the optimizer (every device updates the E / F expert
  # slots it holds) runs after the ticks: experts + optimizer bound each split's step from below,
  # and for every split with fewer expert devices that floor already exceeds the 8:8 step.
  for split, p in splits.items():
    assert p.step_s >= p.time('experts', 'optimizer')
    if split != '8:8':
      assert p.time('experts', 'optimizer') > best.step_s
  # Per token and device, 8 expert devices compute 1.34 GFLOP / 8 of experts and 8 attention
  # devices 2 of the 16 heads (18 MFLOP): the expert devices are busy ~9x longer.
  assert best.busy['experts'] > 5 * best.busy['attention']


def test_calibration_overrides_modelled_figures(tmp_path):
  path = tmp_path / 'cal.json'
  path.write_text(
    json.dumps(
      {
        'device': 'test GPU',
        'matmul_tflops': 200.0,
        'kernels': {
          'attention': [{'mode': 'decode', 'heads': 3, 'batch': 24, 'seq': 2048, 'time_s': 1e-3}],
          'expert_ffn': [
            {'local_experts': 4, 'tokens': 10, 'time_s': 1e-4},
            {'local_experts': 4, 'tokens': 50, 'time_s': 5e-4},
          ],
        },
      }
    )
  )
  cal = pm.Calibration.load(str(path))
  hw, measured = cal.apply(SEED_HW, 'bfloat16')
  assert hw.bf16_flops == 200e12 and measured == ['bf16_flops']
  split = ma_sep.Split(12, 4, 1)
  modelled = ma_sep.predict(SEED, hw, DECODE, split)
  p = ma_sep.predict(SEED, hw, DECODE, split, cal)
  # 12:4 gives each attention device ceil(32 / 12) = 3 head slots: the measured entry, once per
  # layer (one micro-batch of all 24 sequences).
  attn = {t.name: t for t in p.terms}['attention']
  assert attn.measured and attn.time_s == pytest.approx(4 * 1e-3)
  assert not {t.name: t for t in modelled.terms}['attention'].measured
  assert p.step_s > modelled.step_s
  # 24 tokens x top-2 x 4/16 of the experts = 12 pairs reach a 4-expert device per layer: the
  # line through (10, 1e-4) and (50, 5e-4) gives 1.2e-4.
  experts = {t.name: t for t in p.terms}['experts']
  assert experts.measured and experts.time_s == pytest.approx(4 * 1.2e-4)
  assert cal.expert_time(SEED, 4, 48, 16384) == pytest.approx(4.8e-4)
  assert 'experts' in p.measured
  assert cal.attention_time(SEED, 'decode', 4, 24, 2048) is None  # no entry for 4 heads
  # One entry of a key: in proportion (batch 48 is twice the measured 24).
  assert cal.attention_time(SEED, 'decode', 3, 48, 2048) == pytest.approx(2e-3)


def test_calibration_keeps_capacity_and_dropless_timings_apart():
  entries = [
    {'local_experts': 2, 'tokens': 100, 'dropless': False, 'time_s': 1.0},
    {'local_experts': 2, 'tokens': 100, 'dropless': True, 'time_s': 3.0},
  ]
  cal = pm.Calibration(expert_ffn=entries)
  dropless = dataclasses.replace(SEED, dropless=True)
  assert cal.expert_time(SEED, 2, 100, SEED.expert_hidden) == pytest.approx(1.0)
  assert cal.expert_time(dropless, 2, 200, SEED.expert_hidden) == pytest.approx(6.0)


def test_load_hardware_json_and_overrides(tmp_path):
  path = tmp_path / 'hw.json'
  path.write_text(json.dumps({'base': 'h100', 'hbm_bw': 3.0e12}))
  hw = pm.load_hardware(str(path), {'gpus_per_node': 4})
  assert (hw.hbm_bw, hw.gpus_per_node, hw.bf16_flops) == (3.0e12, 4, 989.4e12)
  assert pm.load_hardware('a100_80g').peak_flops('float8') == 312e12


def test_reproduce_afd_cli(tmp_path):
  plot_dir = tmp_path / 'new'  # created by the CLI
  out = subprocess.run(
    [sys.executable, '-m', 'mas_jax.perf', '--reproduce=afd', f'--plot_dir={plot_dir}'],
    capture_output=True,
    text=True,
    check=True,
  )
  assert '33.1 %' in out.stdout and '65.5 %' in out.stdout
  assert (plot_dir / 'afd_roofline.png').stat().st_size > 10_000


def test_reproduce_seed_cli():
  out = subprocess.run(
    [sys.executable, '-m', 'mas_jax.perf', '--reproduce=seed'],
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  assert out.count('| TPOT (ms)') == 2  # the seed cluster with an HDR port per GPU and per node
  assert 'best for decode:' in out and 'IMPOSSIBLE in bf16' in out


def test_optimizer_update_term_by_hand():
  # AdamW reads param, grad, m, v and writes param, m, v (7 x 4 B); the global-norm clip reads
  # the gradient once more: 32 B per parameter held, at HBM bandwidth, once per step.
  assert pm.OPTIMIZER_BYTES_PER_PARAM == 7 * 4 + 4
  assert pm.optimizer_update(1e9, A100) == pm.Cost(pytest.approx(32e9 / 2.039e12), 'hbm')
  one_layer = dataclasses.replace(SEED, num_layers=1, batch_size=8)
  h100 = pm.HARDWARE['h100']
  train = pm.Workload('train', 8, 2048)
  p = ep.predict(one_layer, h100, train, 1, 1)
  opt = {t.name: t for t in p.terms}['optimizer']
  assert opt.bound == 'hbm'
  assert opt.time_s == pytest.approx(pm.total_params(one_layer) * 32 / 3.35e12)  # ~24 ms
  assert p.step_s == pytest.approx(sum(t.time_s for t in p.terms))  # serial on one device
  # ma_sep: every device holds the same buffers (the code's SPMD program): 3 head slots and 4
  # expert slots of every layer (dummy on the other role), the router, both norms, the embedding,
  # head and final norm; AdamW runs over all of it.
  q = ma_sep.predict(SEED, SEED_HW, pm.Workload('train', 16, 2048), ma_sep.Split(12, 4, 1))
  d, L = 4096, 4
  held = L * 4 * d * 3 * 128 + L * 4 * 2 * d * 16384 + L * d * 16 + 2 * L * d + 2 * 32000 * d + d
  assert held == 2_435_092_480
  opt = {t.name: t for t in q.terms}['optimizer']
  assert q.accumulation == 1
  assert opt.time_s == pytest.approx(held * 32 / A100.hbm_bw)
  # Decode has no optimizer.
  assert ep.predict(SEED, A100, DECODE, 8, 8).time('optimizer') == 0
  # train.mu_dtype=bfloat16: the first moment is read and written in 2 B (28 B per parameter),
  # and held in 2 B (6 B of moments per parameter).
  bf16_mu = dataclasses.replace(one_layer, mu_bytes=2)
  p2 = ep.predict(bf16_mu, h100, train, 1, 1)
  assert p2.time('optimizer') == pytest.approx(pm.total_params(one_layer) * 28 / 3.35e12)
  (mem,) = p2.memory_by_role.values()
  (mem32,) = p.memory_by_role.values()
  assert mem.optimizer == pytest.approx(mem32.optimizer * 6 / 8)
  from configs import tiny

  config = tiny.get_config()
  assert pm.ModelSpec.from_config(config).mu_bytes == 4
  config.train.mu_dtype = 'bfloat16'
  assert pm.ModelSpec.from_config(config).mu_bytes == 2


def test_planner_on_one_device_does_not_crash(capsys):
  one_layer = dataclasses.replace(SEED, num_layers=1, batch_size=8)
  preds = report.print_plan(one_layer, pm.HARDWARE['h100'], pm.Workload('train', 8, 2048), 1)
  assert preds and all(p.strategy != 'ma_sep' for p in preds)
  assert 'no ma_sep split on 1 device' in capsys.readouterr().out


def test_grad_accumulation_term_by_hand():
  # Every chunk reads the fp32 accumulator and gradient and writes the accumulator: 12 B/param.
  assert pm.accumulator_update(1e9, 1, A100) == pm.Cost(0.0, 'hbm')
  assert pm.accumulator_update(1e9, 4, A100) == pm.Cost(pytest.approx(4 * 12e9 / 2.039e12), 'hbm')
  one_layer = dataclasses.replace(SEED, num_layers=1, batch_size=32)
  h100 = pm.HARDWARE['h100']
  p = ep.predict(one_layer, h100, pm.Workload('train', 32, 2048, accumulation=4), 1, 1)
  assert p.accumulation == 4
  acc = {t.name: t for t in p.terms}['grad_accumulation']
  assert acc.time_s == pytest.approx(4 * pm.total_params(one_layer) * 12 / 3.35e12)
  assert p.step_s == pytest.approx(sum(t.time_s for t in p.terms))


def test_decode_looks_up_dropless_expert_timings():
  """Generation is dropless whatever the model trained with: decode takes the dropless entry."""
  cal = pm.Calibration(
    expert_ffn=[
      {'local_experts': 4, 'tokens': 12, 'dropless': False, 'time_s': 1e-4},
      {'local_experts': 4, 'tokens': 12, 'dropless': True, 'time_s': 3e-4},
    ]
  )
  assert not SEED.dropless
  # 12:4, one micro-batch of 24 sequences: 24 tokens x top-2 x 4/16 of the experts = 12 pairs.
  p = ma_sep.predict(SEED, SEED_HW, DECODE, ma_sep.Split(12, 4, 1), cal)
  experts = {t.name: t for t in p.terms}['experts']
  assert experts.measured and experts.time_s == pytest.approx(4 * 3e-4)
  # Training keeps the model's own (capacity) routing.
  assert cal.expert_time(SEED, 4, 12, SEED.expert_hidden) == pytest.approx(1e-4)
  assert cal.expert_time(SEED, 4, 12, SEED.expert_hidden, dropless=True) == pytest.approx(3e-4)


def test_reproduce_decode_cli(tmp_path):
  """The seed's decode table and the one-GPU check, hand-computed for the calibrated H100."""
  cal = tmp_path / 'cal.json'
  cal.write_text(
    json.dumps(
      {
        'device': 'test GPU',
        'matmul_tflops': 500.0,
        'hbm_gbps': 1000.0,
        'kernels': {
          'attention': [{'mode': 'decode', 'heads': 32, 'batch': 24, 'seq': 2048, 'time_s': 1e-4}],
          'expert_ffn': [
            {'local_experts': 16, 'tokens': 48, 'dropless': True, 'time_s': 1e-3},
          ],
        },
      }
    )
  )
  bench = tmp_path / 'bench.json'
  row = {'batch': 24, 'context': 2048, 'tpot_s': 5e-3, 'expert_impl': 'auto'}
  bench.write_text(json.dumps({'device': 'test GPU', 'model': {'rows': [row]}}))
  out = subprocess.run(
    [
      sys.executable,
      '-m',
      'mas_jax.perf',
      '--reproduce=decode',
      f'--calibration={cal}',
      f'--measured={bench}',
    ],
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  assert '| MA Separation 12:4 | 1.82' in out and '13,289' in out
  for hw in ('16 x A100, 4/node, HDR per GPU', '16 x H100, 8/node, calibrated (test GPU)'):
    assert hw in out
  assert 'ma_sep 12:4' in out and 'tp_pp tp8xpp2' in out
  # One GPU: 4 layers x (1e-4 attention + 1e-3 experts, both measured) + the unembedding at the
  # measured HBM rate (4096 x 32000 bf16 weights / 1e12 B/s = 0.262 ms; its FLOPs take 0.013 ms).
  # Elementwise traffic (kernels.py; decode is dropless): per layer the norms and residuals of
  # 24 tokens (9 x 4096 x 2 B each), the gather of 48 routed rows (2 x 8192 B each) and the
  # combine (48 + 24 rows of 8192 B); the final norm and embedding gather of 24 tokens
  # (2 x 4096 x 2 + 6 x 4096 B each).
  layer = 24 * 9 * 4096 * 2 + 2 * 48 * 8192 + (48 + 24) * 8192
  elementwise = (4 * layer + 24 * (2 * 4096 * 2 + 6 * 4096)) / 1e12
  predicted = 4 * (1e-4 + 1e-3) + 4096 * 32000 * 2 / 1e12 + elementwise
  line = next(x for x in out.splitlines() if x.startswith('| 24    |'))
  assert f'{predicted * 1e3:.3f}' in line and '5.000' in line
  assert f'{(predicted - 5e-3) / 5e-3:+.1%}' in line


def test_plots(tmp_path):
  from mas_jax.perf import plots

  preds = pm.plan(SEED, pm.HARDWARE['h100'], DECODE, 16)
  assert {p.strategy for p in preds} <= set(plots.STRATEGY_COLORS)
  sweep = tmp_path / 'sweep.png'
  plots.plot_split_sweep(preds, str(sweep), 'decode')
  assert sweep.stat().st_size > 10_000
  # DeepSeek-V3 / H800 peaks at 2 FFN nodes (33.1 %, scale-up bound); past it BW_eff falls to
  # one NIC per rank, and the other systems' bounds never rise after 1 node: the dead zone
  # starts at 2.
  assert plots.dead_zone_start() == 2


def test_the_planner_imports_no_jax():
  """The model of the program must not depend on the program: no JAX in mas_jax.perf."""
  code = (
    'import sys; import mas_jax.perf, mas_jax.perf.cli, mas_jax.perf.validate, '
    'mas_jax.perf.reproduce, mas_jax.perf.hlo; '
    "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith('jax.')))"
  )
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == '[]'


def test_fused_gradient_accumulation_moves_fewer_bytes():
  """train.fuse_grad_accum on one device with accumulation: the expert weights' accumulator
  bytes per chunk drop from 12 to 8 (pm.FUSED_ACCUMULATOR_BYTES_PER_PARAM); nothing else moves."""
  one = dataclasses.replace(SEED, num_layers=1, batch_size=64)
  hw = dataclasses.replace(pm.HARDWARE['h100'], hbm_bytes=1e13)
  plain = pm.Workload('train', 64, 2048, 4, fit_memory=False)
  fused = dataclasses.replace(plain, fuse_grad_accum=True)
  a, b = ep.predict(one, hw, plain, 1, 1), ep.predict(one, hw, fused, 1, 1)
  experts = 16 * 2 * 4096 * 16384
  saved = 4 * experts * (pm.ACCUMULATOR_BYTES_PER_PARAM - pm.FUSED_ACCUMULATOR_BYTES_PER_PARAM)
  assert a.time('grad_accumulation') - b.time('grad_accumulation') == pytest.approx(
    saved / hw.hbm_bw
  )
  assert a.step_s - b.step_s == pytest.approx(saved / hw.hbm_bw)
  # On several devices the flag changes nothing (the trainer refuses it there).
  assert ep.predict(SEED, hw, fused, 16, 16).step_s == ep.predict(SEED, hw, plain, 16, 16).step_s


def test_grouped_experts_compute_the_routed_pairs_only():
  """Capacity routing on grouped matmuls (model.expert_impl='mosaic_gpu' on one device) computes
  the routed pairs with the grouped kernel's (dropless) timings and gathers, like dropless
  routing; strategies that move capacity buffers keep the padding."""
  one_layer = dataclasses.replace(SEED, num_layers=1, batch_size=8)
  cal = pm.Calibration(
    expert_ffn=[
      {'local_experts': 16, 'tokens': 32768, 'dropless': False, 'time_s': 9e-3},
      {'local_experts': 16, 'tokens': 32768, 'dropless': True, 'time_s': 7e-3},
    ]
  )
  w = pm.Workload('train', 8, 2048, 1, fit_memory=False)
  hw = pm.HARDWARE['h100']

  def terms(m, n=1, e=1):
    return {t.name: t.time_s for t in ep.predict(m, hw, w, n, e, cal).terms}

  einsum = terms(one_layer)
  grouped = terms(dataclasses.replace(one_layer, grouped_experts=True))
  dropless = terms(dataclasses.replace(one_layer, dropless=True))
  assert einsum['experts'] == pytest.approx(3 * 9e-3)
  assert grouped['experts'] == pytest.approx(3 * 7e-3) == pytest.approx(dropless['experts'])
  assert grouped['elementwise'] == pytest.approx(dropless['elementwise'])
  assert grouped['elementwise'] < einsum['elementwise']  # no zeroed capacity buffers
  from configs import tiny

  config = tiny.get_config()
  assert not pm.ModelSpec.from_config(config).grouped_experts  # 'auto'
  config.model.expert_impl = 'mosaic_gpu'
  assert pm.ModelSpec.from_config(config).grouped_experts
  # ep > 1 runs the einsum on capacity buffers: the flag changes nothing there.
  on_four = dataclasses.replace(one_layer, batch_size=32)
  w4 = dataclasses.replace(w, batch=32)
  a, b = (
    ep.predict(m, hw, w4, 4, 4, cal).step_s
    for m in (on_four, dataclasses.replace(on_four, grouped_experts=True))
  )
  assert a == b
