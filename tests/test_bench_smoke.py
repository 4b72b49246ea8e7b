"""The benchmark scripts run end to end at tiny shapes on CPU (smoke, not timing)."""

import json
import sys

import pytest

sys.path.insert(0, 'bench')

import gpu_bench  # noqa: E402


@pytest.mark.timeout(240)
def test_gpu_bench_smoke(tmp_path, monkeypatch):
  monkeypatch.setattr(sys, 'argv', ['gpu_bench.py', '--smoke', '--out', str(tmp_path)])
  gpu_bench.main()
  result = json.loads((tmp_path / 'cpu_smoke.json').read_text())
  assert result['ceilings']['matmul_bf16_tflops'] > 0
  assert {r['heads'] for r in result['attention']} == {1, 2}
  impls = ('einsum', 'ragged_dot', 'mosaic_gpu')  # mosaic_gpu through its CPU stand-in
  assert all(r[f'{i}_fwd_bwd_s'] > 0 for r in result['expert_ffn'] for i in impls)
  assert result['train_step'][0]['step_s'] > 0
  calibration = json.loads((tmp_path / 'cpu_smoke_calibration.json').read_text())
  assert calibration['kernels']['expert_ffn']
  assert (tmp_path / 'cpu_smoke.md').read_text().startswith('# ')


@pytest.mark.timeout(300)
def test_multi_gpu_bench_smoke(tmp_path):
  """bench/multi_gpu.py on 8 fake CPU devices (its own process: it sets the device count)."""
  import subprocess

  subprocess.run(
    [sys.executable, 'bench/multi_gpu.py', '--smoke', '--out', str(tmp_path)],
    check=True,
    capture_output=True,
    timeout=280,
  )
  result = json.loads((tmp_path / 'multi_gpu_smoke.json').read_text())
  names = [r['overrides']['parallel.strategy'] for r in result['rows']]
  assert names.count('ma_sep') >= 1 and 'tp_pp' in names and 'ep' in names
  losses = [r['loss'] for r in result['rows']]
  # Same model, batch, seed and number of steps: every strategy reaches the same loss.
  assert max(losses) - min(losses) < 1e-4 * abs(losses[0])
  assert all(r['step_s'] > 0 and 'predicted' in r for r in result['rows'])
