"""The held-out validation (mas_jax/perf/validate.py): calibration from kernel rows only, rows
marked in sample / held out by the calibration's lookups, and the cast term counted by hand."""

import json

import pytest

from configs import paper
from mas_jax import perf as pm
from mas_jax.perf import validate

ONE_LAYER = {'model.num_layers': 1, 'model.expert_dropout': 0.0, 'train.grad_accum_steps': 1}


def bench(tmp_path, model_fixed_at=None):
  b = {
    'device': 'test GPU',
    'ceilings': {'matmul_bf16_tflops': 500.0, 'hbm_copy_gbps': 1000.0, 'hbm_chain_gbps': 2000.0},
    'attention': [
      {'impl': 'cudnn', 'heads': 32, 'batch': 4, 'seq': 2048, 'fwd_s': 2e-3},
      {'impl': 'xla', 'heads': 32, 'batch': 4, 'seq': 2048, 'fwd_s': 9.0},  # not what runs
    ],
    'expert_ffn': [
      {'local_experts': 16, 'rows': 16384, 'einsum_fwd_s': 8e-3, 'mosaic_gpu_fwd_s': 1e-2},
    ],
    'train_step': [  # step times never read by the calibration
      {'overrides': {**ONE_LAYER, 'data.batch_size': 4}, 'step_s': 0.1},
      {'overrides': {**ONE_LAYER, 'data.batch_size': 8}, 'step_s': 0.2},
      {'overrides': {**ONE_LAYER, 'data.batch_size': 8, 'model.remat': 'save_dots'}, 'step_s': 1},
    ],
  }
  if model_fixed_at:
    b['model_fixed_at'] = model_fixed_at
  path = tmp_path / 'bench.json'
  path.write_text(json.dumps(b))
  return b, str(path)


def test_calibration_from_kernel_rows_only(tmp_path):
  b, _ = bench(tmp_path)
  cal = validate.calibration_from_bench(b)
  assert cal.figures == {'matmul_tflops': 500.0, 'hbm_gbps': 2000.0}  # chained rate preferred
  assert [e['time_s'] for e in cal.attention] == [2e-3]  # cuDNN only
  assert {(e['dropless'], e['time_s']) for e in cal.expert_ffn} == {(False, 8e-3), (True, 1e-2)}
  m = pm.ModelSpec.from_config(paper.get_config())
  assert cal.expert_time(m, 16, 16384, m.expert_hidden) == pytest.approx(8e-3)
  wide = pm.ModelSpec(**{**m.__dict__, 'd_model': 2048})  # another width: guard keys reject it
  assert cal.expert_time(wide, 16, 16384, m.expert_hidden) is None


def test_rows_in_sample_and_held_out(tmp_path, capsys):
  _, path = bench(tmp_path, model_fixed_at='abc')
  rows = validate.validate(paper.get_config(), 'h100', [path])
  assert [r.group for r in rows] == ['in sample', 'held out', 'held out']
  assert rows[0].lookups == [('attention', 4, 'exact'), ('expert_ffn', 16384, 'exact')]
  assert {how for _, _, how in rows[1].lookups} == {'proportional'}
  assert all(r.new for r in rows) and not rows[2].scored
  out = capsys.readouterr().out
  assert 'held out, measured after the model was fixed | 1 ' in out
  err = rows[1].error()
  assert f'{err:+.2%}' in out  # two decimals, as computed
  # The cast term: every expert and router weight of the layer and the unembedding, fp32 read
  # and bf16 written once per forward pass, at the calibrated HBM rate (attention is calibrated,
  # its casts are inside its timing).
  m = pm.ModelSpec.from_config(paper.get_config())
  params = 16 * 2 * m.d_model * m.expert_hidden + m.d_model * 16 + m.d_model * m.vocab_size
  casts = next(t for t in rows[0].terms if t.name == 'weight_casts')
  assert casts.time_s == pytest.approx(params * 6 / 2000e9)
