"""The benchmark scripts run end to end at tiny shapes on CPU (smoke, not timing)."""

import json
import os
import sys

import pytest
from conftest import CPU_FAST_COMPILE

sys.path.insert(0, 'bench')

import gpu_bench  # noqa: E402


@pytest.mark.timeout(240)
def test_gpu_bench_smoke(tmp_path, monkeypatch):
  monkeypatch.setattr(sys, 'argv', ['gpu_bench.py', '--smoke', '--out', str(tmp_path)])
  gpu_bench.main()
  result = json.loads((tmp_path / 'cpu_smoke.json').read_text())
  assert result['ceilings']['matmul_bf16_tflops'] > 0
  assert {r['heads'] for r in result['attention']} == {1, 2}
  # mosaic_gpu through its CPU stand-in; dense: the same FLOPs through one dense FFN.
  impls = ('einsum', 'ragged_dot', 'mosaic_gpu', 'dense')
  assert all(r[f'{i}_fwd_bwd_s'] > 0 for r in result['expert_ffn'] for i in impls)
  assert result['train_step'][0]['step_s'] > 0
  calibration = json.loads((tmp_path / 'cpu_smoke_calibration.json').read_text())
  assert calibration['kernels']['expert_ffn']
  md = (tmp_path / 'cpu_smoke.md').read_text()
  assert md.startswith('# ')
  # The command it ran with is recorded and shown; --render and --breakdown need only the JSON.
  assert result['command'].endswith(f'python bench/gpu_bench.py --smoke --out {tmp_path}')
  assert f'{result["command"]}`' in md
  saved = str(tmp_path / 'cpu_smoke.json')
  monkeypatch.setattr(sys, 'argv', ['gpu_bench.py', '--render', saved])
  gpu_bench.main()
  assert (tmp_path / 'cpu_smoke.md').read_text() == md
  lines = gpu_bench.breakdown(saved)
  assert any(line.startswith('best train step: ') for line in lines)
  assert any(line.startswith('  mosaic_gpu of dense: forward ') for line in lines)
  assert '% of dense |' in md


def test_breakdowns_of_the_committed_results():
  """Figures docs/benchmarks/README.md quotes, as --breakdown prints them from the committed JSONs
  (and, for the step's time without optimizer and accumulator, the planner's terms): when one
  changes, the README has to follow."""
  import grouped_matmul

  lines = '\n'.join(gpu_bench.breakdown('docs/benchmarks/nvidia_h100_80gb_hbm3.json'))
  assert 'command `python bench/gpu_bench.py --out /root/out`' in lines
  assert 'mosaic_gpu: forward 59-71%, forward + backward 67-76%' in lines
  assert '4 micro-batches of 16 sequences: 93.40 TFLOP each' in lines
  assert '193.8 ms per micro-batch, 482.0 TFLOP/s, 48.7% of the datasheet peak' in lines
  lines = '\n'.join(
    grouped_matmul.breakdown('docs/benchmarks/nvidia_h100_80gb_hbm3_grouped_matmul.json')
  )
  assert '128 x 256: 93.9-113.1' in lines
  assert '988-1062 routed rows per expert' in lines
  # Session 11's last call: the yardstick beside the result, the expert sweep without ragged_dot.
  lines = '\n'.join(
    gpu_bench.breakdown('docs/benchmarks/session11/call3/nvidia_h100_80gb_hbm3.json')
  )
  assert 'step 85.6 ms, MFU 27.6%' in lines
  assert "737.7 ms, MFU 51.2%, 1.857x the yardstick (the best row with {'train.mu_dtype'" in lines
  assert (
    'forward + backward (forward): 1: 94% (112%), 2: 102% (91%), 4: 97% (89%), 8: 91% (89%), '
    '16: 89% (85%)' in lines
  )
  assert 'ragged_dot' not in lines


def test_expert_sweep_options(tmp_path, monkeypatch):
  """--ffn_impls and --local_experts narrow the expert sweep (the table lists what ran), and an
  unknown implementation is refused before any work."""
  argv = ['gpu_bench.py', '--smoke', '--skip', 'attention,train', '--out', str(tmp_path)]
  monkeypatch.setattr(sys, 'argv', [*argv, '--ffn_impls=einsum,mosaic_2wg', '--local_experts=2'])
  gpu_bench.main()
  (row,) = json.loads((tmp_path / 'cpu_smoke.json').read_text())['expert_ffn']
  assert row['mosaic_2wg_fwd_bwd_s'] > 0 and 'ragged_dot_fwd_s' not in row
  md = (tmp_path / 'cpu_smoke.md').read_text()
  assert '| 2 | 16 | mosaic_2wg |' in md and '| ragged_dot |' not in md
  monkeypatch.setattr(sys, 'argv', [*argv, '--ffn_impls=einsum,cutlass'])
  with pytest.raises(SystemExit):
    gpu_bench.main()


@pytest.mark.timeout(120)
def test_step_profile_smoke(tmp_path, monkeypatch):
  """bench/step_profile.py traces the train step and classes every kernel by kind, named scope
  and pass (on CPU: the thunk executor's op events)."""
  import step_profile

  argv = ['step_profile.py', '--smoke', '--out', str(tmp_path), '--steps', '2']
  monkeypatch.setattr(sys, 'argv', [*argv, '--overrides', '{"train.grad_accum_steps": 2}'])
  step_profile.main()
  result = json.loads((tmp_path / 'cpu_smoke_profile.json').read_text())
  groups = result['groups']
  assert sum(g['ms_per_step'] for g in groups) == pytest.approx(result['kernel_ms_per_step'])
  seen = {(g['kind'], g['scope'], g['pass']) for g in groups}
  for scope in ('attention', 'experts', 'head'):
    assert ('matmul', scope, 'forward') in seen and ('matmul', scope, 'backward') in seen, scope
  for scope in ('accumulate', 'optimizer', 'dispatch', 'combine'):
    assert any(g[0] == 'elementwise' and g[1] == scope for g in seen), scope
  # The optimizer's fused update reads and writes every parameter and moment.
  opt = sum(g['gb_per_step'] for g in groups if g['scope'] == 'optimizer')
  assert opt * 1e9 >= 7 * 4 * result['params'] * 0.9
  md = (tmp_path / 'cpu_smoke_profile.md').read_text()
  monkeypatch.setattr(
    sys, 'argv', ['step_profile.py', '--render', str(tmp_path / 'cpu_smoke_profile.json')]
  )
  step_profile.main()
  assert (tmp_path / 'cpu_smoke_profile.md').read_text() == md
  assert (tmp_path / 'cpu_smoke_profile.hlo.txt.gz').exists()


@pytest.mark.timeout(120)
def test_qkv_fusion_smoke(tmp_path, monkeypatch):
  """bench/qkv_fusion.py: the fused QKV projection gives the library's attention output."""
  import qkv_fusion

  # One flag set XLA takes (the defaults) and one it rejects, each in a child process.
  flags = ';--xla_no_such_flag=1'
  argv = ['qkv_fusion.py', '--smoke', '--out', str(tmp_path), f'--flag_sets={flags}']
  monkeypatch.setattr(sys, 'argv', argv)
  qkv_fusion.main()
  result = json.loads((tmp_path / 'qkv_fusion.json').read_text())
  (row,) = result['cases']
  assert row['max_rel_diff'] < 1e-5
  assert row['separate_fwd_bwd_ms'] > 0 and row['fused_fwd_bwd_ms'] > 0
  default, bad = result['flag_sets']
  assert default['xla_flags'] == '' and default['cases'][0]['fused_fwd_bwd_ms'] > 0
  assert bad['xla_flags'] == '--xla_no_such_flag=1' and bad['error']
  md = (tmp_path / 'qkv_fusion.md').read_text()
  assert '| (defaults) | 2 | 2 |' in md and '| `--xla_no_such_flag=1` | error: ' in md


@pytest.mark.timeout(120)
def test_grad_accum_fusion_smoke(tmp_path, monkeypatch):
  """bench/grad_accum_fusion.py: the fused accumulation gives the separate one's gradients."""
  import grad_accum_fusion

  monkeypatch.setattr(sys, 'argv', ['grad_accum_fusion.py', '--smoke', '--out', str(tmp_path)])
  grad_accum_fusion.main()
  cases = json.loads((tmp_path / 'grad_accum_fusion.json').read_text())['cases']
  assert [(c['rows'], c['layers']) for c in cases] == [(8, 1), (8, 2)]
  for c in cases:
    assert c['rel_diff'] < 1e-6  # float32 on the CPU: both sum the same float32 gradients
    assert c['separate_ms'] > 0 and c['fused_ms'] > 0


def test_step_profile_classes():
  import step_profile

  text = """HloModule jit_train_step
%fused_computation.1 (p0: bf16[4,8], p1: bf16[8,2]) -> bf16[4,2] {
  %p0 = bf16[4,8]{1,0} parameter(0)
  %p1 = bf16[8,2]{1,0} parameter(1)
  ROOT %dot.1 = bf16[4,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
ENTRY %main (a: bf16[4,8], b: bf16[8,2], m: f32[4,2]) -> (f32[4,2], f32[4,2]) {
  %a = bf16[4,8]{1,0} parameter(0)
  %b = bf16[8,2]{1,0} parameter(1)
  %m = f32[4,2]{1,0} parameter(2)
  %gemm_fusion = bf16[4,2]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation.1, \
metadata={op_name="jit(train_step)/transpose(jvp(moe))/experts/dot_general"}
  %loop_fusion = f32[4,2]{1,0} fusion(%gemm_fusion, %m), kind=kLoop, \
calls=%fused_computation.2, metadata={op_name="jit(train_step)/optimizer/add"}
  ROOT %t = (f32[4,2]{1,0}, f32[4,2]{1,0}) tuple(%loop_fusion, %m)
}
"""
  ops = step_profile.hlo_ops(text)
  assert ops['gemm_fusion']['has_dot'] and not ops['loop_fusion']['has_dot']
  assert ops['loop_fusion']['in_bytes'] == 4 * 2 * 2 + 4 * 2 * 4
  assert ops['loop_fusion']['out_bytes'] == 32
  assert step_profile.classify('loop_fusion', ops['gemm_fusion']) == (
    'matmul',
    'experts',
    'backward',
  )
  assert step_profile.classify('loop_fusion', ops['loop_fusion']) == (
    'elementwise',
    'optimizer',
    'forward',
  )
  assert step_profile.classify('cudnn_generated_fort_native_sdpa', None)[0] == 'attention'
  assert step_profile.classify('sm90_xmma_gemm_bf16', None)[0] == 'matmul'


@pytest.mark.timeout(120)
def test_yardstick_smoke(tmp_path, monkeypatch):
  """bench/yardstick.py (plain JAX) trains at tiny shapes, and counts FLOPs as metrics.py does."""
  import yardstick

  from configs import paper
  from mas_jax import config as config_lib
  from mas_jax import metrics

  out = tmp_path / 'yardstick.json'
  monkeypatch.setattr(sys, 'argv', ['yardstick.py', '--smoke', '--out', str(out)])
  yardstick.main()
  result = json.loads(out.read_text())
  assert result['command'].endswith(f'python bench/yardstick.py --smoke --out {out}')
  assert result['step_s'] > 0 and result['tokens_per_s'] > 0 and result['mfu'] > 0
  assert result['losses'][-1] < result['losses'][0]
  # At the seed's shapes (one layer): mas-jax's parameter count and model FLOPs per token.
  cd = paper.get_config()
  cd.model.num_layers = 1
  model = config_lib.from_config_dict(cd).model
  assert yardstick.param_count(yardstick.Shape()) == metrics.param_count(model)['total']
  assert yardstick.train_flops_per_token(yardstick.Shape()) == pytest.approx(
    metrics.train_flops_per_token(model, cd.data.seq_len)
  )


@pytest.mark.timeout(300)
def test_multi_gpu_bench_smoke(tmp_path):
  """bench/multi_gpu.py on 8 fake CPU devices (its own process: it sets the device count)."""
  import subprocess

  subprocess.run(
    [sys.executable, 'bench/multi_gpu.py', '--smoke', '--out', str(tmp_path)],
    check=True,
    capture_output=True,
    timeout=280,
    env={**os.environ, 'XLA_FLAGS': CPU_FAST_COMPILE},  # the bench adds its device count
  )
  result = json.loads((tmp_path / 'multi_gpu_smoke.json').read_text())
  names = [r['overrides']['parallel.strategy'] for r in result['rows']]
  assert names.count('ma_sep') >= 1 and 'tp_pp' in names and 'ep' in names
  losses = [r['loss'] for r in result['rows']]
  # Same model, batch, seed and number of steps: every strategy reaches the same loss.
  assert max(losses) - min(losses) < 1e-4 * abs(losses[0])
  assert all(r['step_s'] > 0 and 'predicted' in r for r in result['rows'])


@pytest.mark.timeout(300)
def test_decode_bench_smoke(tmp_path, monkeypatch):
  """bench/decode.py: every section at tiny shapes, in two runs merged into one result."""
  import decode

  out = str(tmp_path)
  monkeypatch.setattr(sys, 'argv', ['decode.py', '--smoke', '--out', out, '--sections=experts'])
  decode.main()
  first = tmp_path / 'cpu_smoke_decode.json'
  sections = '--sections=variants,attention,gmm,model'
  argv = ['decode.py', '--smoke', '--out', out, sections, '--merge', str(first)]
  monkeypatch.setattr(sys, 'argv', argv)
  decode.main()
  result = json.loads(first.read_text())
  assert len(result['runs']) == 2 and all(
    r['ceilings']['hbm_copy_gbps'] > 0 for r in result['runs']
  )
  # Every cached-attention variant computes the same function.
  assert max(result['variant_check'].values()) < 1e-5
  assert all(r['time_s'] > 0 and r['ceiling_gbps'] > 0 for r in result['attention'])
  assert {r['impl'] for r in result['experts']} >= {'auto', 'einsum_seq', 'einsum_pad'}
  assert all(r['pairs'] >= 1 and r['gbps'] > 0 for r in result['experts'])
  assert {r['matmul'] for r in result['gmm']} == {'w_in', 'w_out'}
  assert all(r['tpot_s'] > 0 for r in result['model']['rows'])
  calibration = json.loads((tmp_path / 'cpu_smoke_decode_calibration.json').read_text())
  assert {e['mode'] for e in calibration['kernels']['attention']} == {'decode'}
  assert calibration['kernels']['expert_ffn'] and all(
    e['dropless'] for e in calibration['kernels']['expert_ffn']
  )
  assert (tmp_path / 'cpu_smoke_decode.md').read_text().startswith('# Decode')


@pytest.mark.timeout(240)
def test_memory_bench_smoke(tmp_path, monkeypatch):
  """bench/memory.py at the tiny config: ma_sep 12:4 with and without optimizer sharding."""
  import memory

  out = tmp_path / 'memory.json'
  argv = ['memory.py', '--smoke', '--only', 'ma_sep 12:4', '--out', str(out)]
  monkeypatch.setattr(sys, 'argv', argv)
  memory.main()
  rows = {(r['shard_optimizer'], r['role']): r for r in json.loads(out.read_text())['rows']}
  assert set(rows) == {(s, role) for s in (False, True) for role in ('attention', 'expert')}
  # Dummy expert slots: attention devices use a third of the unsharded state; sharded, all of
  # a sixteenth (three fp32 copies of the reference parameters over 16 devices).
  assert rows[(False, 'attention')]['state_efficiency_min'] < 0.5
  sharded = rows[(True, 'attention')]
  assert sharded['state_efficiency_min'] == 1.0
  assert sharded['params'] < rows[(False, 'attention')]['params'] / 4
  assert sharded['optimizer'] == pytest.approx(2 * sharded['params'], abs=64)  # + step counts
  assert sharded['compute_copy_used'] < sharded['compute_copy_held']


@pytest.mark.timeout(240)
def test_ma_sep_memory_bench_smoke(tmp_path, monkeypatch):
  """bench/ma_sep_memory.py --smoke: the tiny config's rows only (written under the cwd)."""
  import ma_sep_memory

  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(sys, 'argv', ['ma_sep_memory.py', '--smoke'])
  ma_sep_memory.main()
  result = json.loads((tmp_path / 'docs/benchmarks/ma_sep_memory_smoke.json').read_text())
  assert list(result) == ['tiny']
  rows = result['tiny']['rows']
  assert len(rows) == 16 and all(r['activations'] > 0 for r in rows)


@pytest.mark.timeout(240)
def test_overlap_bench_smoke(tmp_path):
  """bench/overlap.py --smoke: the tiny ma_sep step compiled in a child process on 16 CPU
  devices, its scheduled HLO's collectives found where ma_sep puts them."""
  import overlap

  out = tmp_path / 'overlap.json'
  overlap.main(['--smoke', '--roles', '--repeats=2', '--out', str(out), '--hlo_dir', str(tmp_path)])
  result = json.loads(out.read_text())
  assert result['commands'][0].startswith('python bench/overlap.py --smoke')
  assert list(result['variants']) == ['default']  # the XLA flag variants are GPU-only
  variant = result['variants']['default']
  assert 'error' not in variant, variant
  assert variant['dispatch'] == 'all_to_all' and variant['ticks'] == 9
  assert (tmp_path / 'default.hlo.txt.gz').exists()
  records = variant['collectives']
  where = {(r['location'], r['kind']) for r in records}
  # The expert row's all_to_all (and the all_gather, reduce-scatter in the backward) only in
  # the switch's expert branch; the tick exchange's psum and ppermutes outside the branches.
  assert ('branch 1 (experts)', 'all-to-all') in where
  assert ('outside conditionals', 'all-reduce') in where
  assert {loc for loc, kind in where if kind == 'all-to-all'} == {'branch 1 (experts)'}
  assert {loc for loc, kind in where if kind == 'collective-permute'} == {'outside conditionals'}
  total = variant['summary']['all']
  assert total['sync'] + total['async'] + total['unpaired'] == len(records)
  assert total['bytes_sync_per_step'] > total['bytes_sync'] > 0  # 2 accumulation chunks
  # --roles: each role's tick timed on one device; over the 9 ticks of L=2, M=4 each role idles
  # in one, so its idle time is at least that tick's (the other role's) time.
  roles = result['roles']
  assert roles['micro_batch'] == [4, 64, 64] and roles['local_experts'] == 4
  for role, other in (('attention', 'experts'), ('experts', 'attention')):
    per = roles['per_step'][role]
    assert per['busy_s'] + per['idle_s'] == pytest.approx(roles['step_compute_s'])
    assert per['idle_s'] >= 2 * sum(roles['ticks'][other].values()) * (1 - 1e-9)
