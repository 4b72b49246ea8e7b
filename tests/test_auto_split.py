"""parallel.attn_devices / moe_devices / num_microbatches = 'auto': the planner's ma_sep split."""

import json
import logging
import os
import re
import subprocess
import sys

import pytest
from conftest import tiny_config

from configs import paper
from mas_jax import config as config_lib
from mas_jax import strategies, train_lib
from mas_jax import workdir as workdir_lib
from mas_jax.perf import HARDWARE, ModelSpec, Workload, planner
from mas_jax.perf import ma_sep as ma_sep_model
from mas_jax.workdir import RunError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = {
  'parallel.strategy': 'ma_sep',
  'parallel.attn_devices': 'auto',
  'parallel.moe_devices': 'auto',
  'parallel.num_microbatches': 'auto',
  'data.source': 'synthetic',
  'data.seq_len': 16,
  'data.batch_size': 4,
  'model.num_layers': 1,
  'train.steps': 2,
  'train.log_every': 1,
  'train.eval_every': 2,
  'train.eval_steps': 1,
  'train.checkpoint_every': 2,
  'train.tensorboard': False,
}
CHOICE = re.compile(
  r'Running parallel\.attn_devices=(\d+), parallel\.moe_devices=(\d+), '
  r'parallel\.num_microbatches=(\d+)\.'
)


def _spec(cd) -> ModelSpec:
  return ModelSpec.from_config(config_lib.from_config_dict(cd))


def test_auto_split_trains_logs_and_records_its_choice(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  cd = tiny_config(**RUN)
  workdir = str(tmp_path / 'run')
  last = train_lib.train_and_evaluate(cd, workdir)
  assert last['loss'] > 0
  text = caplog.text
  assert 'ma_sep split chosen by the planner (mas_jax.perf) for 16 devices on h100' in text
  assert "device kind 'cpu' names no preset" in text  # CPU: parallel.hardware=auto -> h100
  attn, moe, m = (int(x) for x in CHOICE.search(text).groups())
  assert f'Chosen: {attn}:{moe} with M={m} wins' in text
  assert 'busier role' in text and 'the largest term is' in text
  rows = re.findall(r'^\s+([123])\s+(\d+:\d+)\s+(\d+)\s+(\d+)\s', text, re.M)
  assert [r[0] for r in rows] == ['1', '2', '3'] and rows[0][1:3] == (f'{attn}:{moe}', str(m))
  # A split the strategy accepts, and the one the planner ranks first.
  s = ma_sep_model.Split(attn, moe, m)
  assert ma_sep_model.invalid(_spec(cd), s, 4, 16) is None and attn + moe == 16
  with open(os.path.join(workdir, 'config.json')) as f:
    recorded = json.load(f)['parallel']
  assert (recorded['attn_devices'], recorded['moe_devices'], recorded['num_microbatches']) == (
    attn,
    moe,
    m,
  )
  assert cd.parallel.attn_devices == 'auto'  # the caller's ConfigDict is left as given

  # A resume with 'auto' resolves the same split, so the run identity holds (what
  # train_and_evaluate checks before restoring; train.steps is safe to change).
  more = tiny_config(**{**RUN, 'train.steps': 3})
  _, resolved = train_lib.resolve_auto_placement(config_lib.from_config_dict(more), more)
  workdir_lib.check_identity(workdir, resolved.to_json_best_effort(), [], 2, write=False)

  # A run recorded with another split stops with the identity check's one line.
  other = str(tmp_path / 'other')
  os.makedirs(other)
  a2, f2 = (8, 8) if (attn, moe) != (8, 8) else (12, 4)
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)
  saved['parallel'].update(attn_devices=a2, moe_devices=f2)
  with open(os.path.join(other, 'config.json'), 'w') as f:
    json.dump(saved, f)
  with pytest.raises(RunError) as err:
    train_lib.train_and_evaluate(tiny_config(**RUN), other)
  message = str(err.value)
  assert f'parallel.attn_devices: {a2} -> {attn}' in message and '\n' not in message


@pytest.mark.parametrize(
  'overrides, message',
  [
    ({'parallel.attn_devices': 'autox'}, "parallel.attn_devices='autox' must be a positive"),
    ({'parallel.moe_devices': 0}, "parallel.moe_devices=0 must be a positive integer or 'auto'"),
    ({'parallel.num_microbatches': -2}, 'parallel.num_microbatches=-2 must be a positive'),
    ({'parallel.num_microbatches': 2.5}, 'parallel.num_microbatches=2.5 must be a positive'),
    (
      {'parallel.strategy': 'dp'},
      "parallel.attn_devices='auto' is chosen by the planner for parallel.strategy='ma_sep' only",
    ),
    (
      {'data.batch_size': 3, 'data.seq_len': 5},
      'no valid ma_sep split of 16 devices (model.num_experts=16',
    ),
    (
      {'parallel.attn_devices': 13},
      'no valid ma_sep split of 16 devices with attn_devices=13',
    ),
    ({'parallel.hardware': 'h1000'}, "parallel.hardware='h1000' is neither a preset"),
  ],
)
def test_bad_auto_values_fail_in_one_line_before_any_work(tmp_path, overrides, message):
  cd = tiny_config(**{**RUN, **overrides})
  with pytest.raises(config_lib.ConfigError) as err:
    train_lib.train_and_evaluate(cd, str(tmp_path / 'w'))
  assert message in str(err.value) and '\n' not in str(err.value)
  assert not os.path.exists(tmp_path / 'w')  # nothing started


def test_unresolved_auto_is_refused_by_the_strategy_registry():
  config = config_lib.from_config_dict(tiny_config(**RUN))
  with pytest.raises(config_lib.ConfigError, match="attn_devices='auto' is not resolved"):
    strategies.get(config)


def test_train_py_bad_value_exits_with_one_line(tmp_path):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run(
    [
      sys.executable,
      'train.py',
      f'--workdir={tmp_path}/w',
      '--config.parallel.strategy=ma_sep',
      '--config.parallel.attn_devices=autox',
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
    "ConfigError: parallel.attn_devices='autox' must be a positive integer or 'auto'"
  )


def _paper():
  cd = paper.get_config()
  return ModelSpec.from_config(cd), Workload('train', 1024, 2048, 1)


def test_choose_on_the_paper_model_for_16_h100s():
  m, w = _paper()
  hw = HARDWARE['h100']
  best, ranked, reason = planner.choose_ma_sep_split(m, hw, w, 16)
  assert best is ranked[0] and len(ranked) >= 3
  for p in ranked:  # only splits the strategy accepts, at an M it accepts
    a, f = (int(x) for x in p.split.split(':'))
    assert a + f == 16
    assert ma_sep_model.invalid(m, ma_sep_model.Split(a, f, p.microbatches), 1024, 2048) is None
  assert {p.split for p in ranked} == {'15:1', '14:2', '12:4', '8:8'}  # 16 experts: F | 16
  keys = [(not p.fits, p.step_s) for p in ranked]
  assert keys == sorted(keys)
  # The same winner as the full planner's best ma_sep placement.
  plan_best = next(p for p in planner.plan(m, hw, w, 16) if p.strategy == 'ma_sep')
  assert (best.split, best.microbatches, best.step_s) == (
    plan_best.split,
    plan_best.microbatches,
    plan_best.step_s,
  )
  busier = max(best.busy, key=best.busy.get)
  assert reason.startswith(f'{best.split} with M={best.microbatches} wins')
  assert (
    f'the {"attention" if busier == "attention" else "expert"} devices are the busier' in reason
  )
  assert f'the largest term is {best.bound}' in reason and '\n' not in reason
  block = planner.describe_ma_sep_choice(best, ranked, reason, 16, 'h100')
  assert block.count('\n') >= 4 and f'Chosen: {reason}.' in block

  # Fixed fields constrain the choice.
  only, ranked12, _ = planner.choose_ma_sep_split(m, hw, w, 16, attn_devices=12)
  assert [p.split for p in ranked12] == ['12:4'] and only.split == '12:4'
  _, at_m2, _ = planner.choose_ma_sep_split(m, hw, w, 16, microbatches=2)
  assert {p.microbatches for p in at_m2} == {2}
  with pytest.raises(ValueError, match='no valid ma_sep split of 16 devices with moe_devices=3'):
    planner.choose_ma_sep_split(m, hw, w, 16, moe_devices=3)


def test_hardware_for_device():
  hw, cal, text = planner.hardware_for_device('NVIDIA H100 80GB HBM3', 'auto', 'bfloat16')
  assert cal is not None and 'nvidia_h100_80gb_hbm3_calibration.json' in text
  assert hw.bf16_flops != HARDWARE['h100'].bf16_flops  # the measured matmul rate
  hw, cal, text = planner.hardware_for_device('NVIDIA H200', 'auto')
  assert (hw, cal) == (HARDWARE['h200'], None) and 'datasheet' in text
  assert planner.hardware_for_device('cpu')[0] == HARDWARE[planner.FALLBACK_HARDWARE]
  assert planner.hardware_for_device('NVIDIA H100 80GB HBM3', 'a100_80g')[:2] == (
    HARDWARE['a100_80g'],
    None,
  )
  with pytest.raises(ValueError, match="parallel.hardware='nope' is neither a preset"):
    planner.hardware_for_device('cpu', 'nope')
