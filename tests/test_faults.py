"""Fault injection: each way a run could train on garbage or lose work, and what happens instead.

One straight 6-step run (checkpoints at steps 2, 4 and 6) is shared; each test copies its
workdir, breaks something, runs again and checks the new behaviour, and that no good checkpoint
and no metrics line was lost. The numbered cases are those of the reliability issue:
 1 a flipped byte, 2 an edited data state, 3 truncated / missing files and no good step at all,
 4 NaN, 5 a mistyped data_dir, 6 a changed config, 7 the workdir lock, 8 signals, 9 a failed
 save, 10 duplicate metric lines, 11 an unknown flag.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import CPU_FAST_COMPILE, read_metrics, restore_state, tiny_config

from mas_jax import checkpoint as checkpoint_lib
from mas_jax import train_lib
from mas_jax import workdir as workdir_lib
from mas_jax.config import ConfigError
from mas_jax.workdir import RunError

pytestmark = pytest.mark.timeout(180)

REPO = pathlib.Path(__file__).resolve().parents[1]
# One block: every run here compiles in about half the time, and the checkpoint machinery under
# test does not depend on the depth.
OVERRIDES = {
  'model.num_layers': 1,
  'data.seq_len': 16,
  'data.batch_size': 4,
  'data.prefetch': 0,
  'train.steps': 6,
  'train.log_every': 1,
  'train.eval_every': 6,
  'train.eval_steps': 1,
  'train.checkpoint_every': 2,
  'train.keep_checkpoints': 3,
}


def _config(sample_dir, **more):
  return tiny_config(**{**OVERRIDES, 'data.data_dir': sample_dir, **more})


def _assert_samerestore_state(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _steps(workdir, sub='checkpoints'):
  path = os.path.join(workdir, sub)
  return sorted(int(n.split('.')[0]) for n in os.listdir(path)) if os.path.isdir(path) else []


def _largest_file(directory):
  files = [p for p in pathlib.Path(directory).rglob('*') if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


@pytest.fixture(scope='module')
def straight(sample_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('straight'))
  train_lib.train_and_evaluate(_config(sample_dir), workdir)
  return workdir


@pytest.fixture
def copy(straight, tmp_path):
  """A fresh copy of the straight run's workdir."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(straight, workdir)
  return workdir


def _assert_resumed_like_straight(copy, straight, restored_step):
  """The rerun trained to step 6 exactly as the straight run, each metrics step once."""
  _assert_samerestore_state(restore_state(copy, 6), restore_state(straight, 6))
  records = read_metrics(copy)
  assert [r['step'] for r in records] == [1, 2, 3, 4, 5, 6]
  for a, b in zip(records, read_metrics(straight), strict=True):
    assert (a['loss'], a['grad_norm']) == (b['loss'], b['grad_norm'])
  assert restored_step in _steps(copy)


def test_straight_run_saves_checksums(straight):
  assert _steps(straight) == [2, 4, 6]
  integrity = json.loads((pathlib.Path(straight) / 'checkpoints/6/integrity/metadata').read_text())
  assert integrity['step'] == 6 and integrity['format'] == checkpoint_lib.FORMAT
  # Restored without a target, optax's named tuples come back as lists: compare the values.
  restored = checkpoint_lib.array_checksums(restore_state(straight, 6))
  assert sorted(integrity['arrays'].values()) == sorted(restored.values())


def test_checksum_sees_a_flipped_bit_and_a_moved_value():
  x = np.arange(12, dtype=np.float32).reshape(3, 4)
  base = checkpoint_lib.array_checksums({'x': x})
  flipped = x.copy()
  flipped.view(np.uint32)[1, 2] ^= 1 << 7
  swapped = x.copy()
  swapped[0, 0], swapped[0, 1] = x[0, 1], x[0, 0]
  assert checkpoint_lib.array_checksums({'x': flipped}) != base
  assert checkpoint_lib.array_checksums({'x': swapped}) != base
  assert checkpoint_lib.array_checksums({'x': x.copy()}) == base


def test_1_flipped_byte_falls_back_to_the_previous_step(copy, straight, sample_dir, caplog):
  target = _largest_file(os.path.join(copy, 'checkpoints/6/state'))
  data = bytearray(target.read_bytes())
  data[len(data) // 2] ^= 0xFF
  target.write_bytes(bytes(data))
  train_lib.train_and_evaluate(_config(sample_dir), copy)
  warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
  assert any('step 6' in w and 'unusable' in w for w in warnings), warnings
  assert _steps(copy, checkpoint_lib.BAD_DIR) == [6]  # renamed aside, never deleted
  _assert_resumed_like_straight(copy, straight, 4)


def test_2_edited_data_state_falls_back(copy, straight, sample_dir, caplog):
  meta = pathlib.Path(copy) / 'checkpoints/6/data/metadata'
  data = json.loads(meta.read_text())
  data['shards'][0]['docs'] += 1
  meta.write_text(json.dumps(data))
  train_lib.train_and_evaluate(_config(sample_dir), copy)
  assert any('data-iterator state' in r.getMessage() for r in caplog.records)
  _assert_resumed_like_straight(copy, straight, 4)


def test_3_truncated_and_missing_files_fall_back_two_steps(copy, straight, sample_dir, caplog):
  target = _largest_file(os.path.join(copy, 'checkpoints/6/state'))
  target.write_bytes(target.read_bytes()[: target.stat().st_size // 3])
  os.remove(os.path.join(copy, 'checkpoints/4/state/_METADATA'))
  train_lib.train_and_evaluate(_config(sample_dir), copy)
  warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
  assert any('step 4' in w and 'missing state/_METADATA' in w for w in warnings), warnings
  assert _steps(copy, checkpoint_lib.BAD_DIR) == [4, 6]
  _assert_resumed_like_straight(copy, straight, 2)


def test_3_no_good_checkpoint_stops_and_touches_nothing(copy, sample_dir):
  for step in (2, 4, 6):
    os.remove(os.path.join(copy, f'checkpoints/{step}/state/_METADATA'))
  before = sorted(str(p) for p in pathlib.Path(copy).rglob('*'))
  with pytest.raises(checkpoint_lib.CheckpointError, match='no usable checkpoint') as e:
    train_lib.train_and_evaluate(_config(sample_dir), copy)
  assert '\n' not in str(e.value)
  assert sorted(str(p) for p in pathlib.Path(copy).rglob('*')) == before


def test_4_nan_stops_before_saving_it(sample_dir, tmp_path):
  workdir = str(tmp_path / 'nan')
  cd = _config(sample_dir, **{'train.learning_rate': 1e6, 'train.steps': 30})
  with pytest.raises(train_lib.NonFiniteError, match=r'^step \d+: (loss|grad_norm)=(nan|inf)') as e:
    train_lib.train_and_evaluate(cd, workdir)
  bad_step = int(str(e.value).split(':')[0].split()[1])
  saved = _steps(workdir)
  assert saved and max(saved) < bad_step, (saved, bad_step)
  for leaf in jax.tree.leaves(restore_state(workdir, max(saved))['params']):
    assert np.all(np.isfinite(leaf))
  records = read_metrics(workdir)  # valid JSON: non-finite values are null
  assert [r['step'] for r in records] == list(range(1, bad_step + 1))
  assert None in (records[-1]['loss'], records[-1]['grad_norm'])


def test_4_skip_nonfinite_steps_skips_then_stops(sample_dir, tmp_path, caplog):
  workdir = str(tmp_path / 'skip')
  cd = _config(
    sample_dir,
    **{'train.learning_rate': 1e6, 'train.steps': 30, 'train.skip_nonfinite_steps': 2},
  )
  with pytest.raises(train_lib.NonFiniteError, match='after 2 skipped steps'):
    train_lib.train_and_evaluate(cd, workdir)
  skipped = [r for r in caplog.records if 'the update was skipped' in r.getMessage()]
  assert len(skipped) == 2
  records = read_metrics(workdir)
  assert [r['skipped_steps'] for r in records[-3:]] == [1, 2, 3]
  # A skipped step leaves the parameters alone: the newest checkpoint is finite.
  for leaf in jax.tree.leaves(restore_state(workdir, max(_steps(workdir)))['params']):
    assert np.all(np.isfinite(leaf))


def test_5_mistyped_data_dir_is_an_error_and_creates_nothing(tmp_path):
  typo = tmp_path / 'c4_tpyo'
  with pytest.raises(ConfigError, match='holds no prepared c4/en:3.1.0') as e:
    train_lib.train_and_evaluate(tiny_config(**{'data.data_dir': str(typo)}), str(tmp_path / 'w'))
  assert 'versions of c4/en there: none' in str(e.value)
  assert not typo.exists() and not (tmp_path / 'w').exists()


def test_6_changed_config_stops_with_the_fields(copy, sample_dir):
  before = (pathlib.Path(copy) / 'config.json').read_text()
  cd = _config(sample_dir, **{'train.learning_rate': 1e-3, 'seed': 1, 'train.steps': 7})
  with pytest.raises(RunError, match='seed: 0 -> 1, train.learning_rate: 0.003 -> 0.001'):
    train_lib.train_and_evaluate(cd, copy)
  assert (pathlib.Path(copy) / 'config.json').read_text() == before
  assert _steps(copy) == [2, 4, 6]


def test_6_accepted_change_resumes_and_is_recorded(copy, sample_dir):
  cd = _config(sample_dir, **{'train.learning_rate': 1e-3, 'train.steps': 7})
  train_lib.train_and_evaluate(cd, copy, resume_changed=['train.learning_rate'])
  assert [r['step'] for r in read_metrics(copy)] == [1, 2, 3, 4, 5, 6, 7]
  (entry,) = [json.loads(line) for line in open(os.path.join(copy, workdir_lib.HISTORY))]
  assert entry['step'] == 6
  assert entry['changes'] == {'train.learning_rate': [0.003, 0.001], 'train.steps': [6, 7]}
  # The accepted config is the run's config now: resuming with it needs no flag (the same
  # program as the run before: loaded from the compilation cache).
  train_lib.train_and_evaluate(cd, copy)


def test_6_other_shapes_are_one_line(copy, sample_dir):
  cd = _config(sample_dir, **{'model.d_model': 32})
  with pytest.raises(checkpoint_lib.IncompatibleCheckpoint, match='does not fit this config') as e:
    train_lib.train_and_evaluate(cd, copy, resume_changed=['model.d_model'])
  assert '\n' not in str(e.value)


def test_7_locked_workdir_names_the_holder(copy, sample_dir):
  holder = subprocess.Popen(
    [
      sys.executable,
      '-c',
      'import sys, time; sys.path.insert(0, sys.argv[1]); from mas_jax import workdir; '
      'workdir.WorkdirLock(sys.argv[2]).acquire(); print("held", flush=True); time.sleep(60)',
      str(REPO),
      copy,
    ],
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == 'held'
    with pytest.raises(RunError, match=f'in use by another run \\(PID {holder.pid} on '):
      train_lib.train_and_evaluate(_config(sample_dir), copy)
  finally:
    holder.kill()
    holder.wait()


def test_7_stale_lock_is_taken_over(copy, sample_dir, caplog):
  pathlib.Path(copy, workdir_lib.LOCK).write_text('PID 999999 on a-dead-host\n')
  train_lib.train_and_evaluate(_config(sample_dir), copy)
  assert any('stale lock of PID 999999' in r.getMessage() for r in caplog.records)
  assert pathlib.Path(copy, workdir_lib.LOCK).read_text() == ''  # released cleanly


def test_8_signal_in_process_sets_the_flag_without_raising():
  with train_lib._StopSignals() as signals:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)
    assert signals.received == 'SIGINT' and signals.stop_requested()


def _train_cmd(workdir, sample_dir, *flags):
  overrides = {**OVERRIDES, 'data.data_dir': sample_dir}
  return [
    sys.executable,
    'train.py',
    f'--workdir={workdir}',
    '--config.train.tensorboard=False',
    *(f'--config.{k}={v}' for k, v in overrides.items()),
    *flags,
  ]


def test_8_sigterm_saves_and_exits_0(sample_dir, tmp_path):
  workdir = str(tmp_path / 'term')
  cmd = _train_cmd(
    workdir, sample_dir, '--config.train.steps=100000', '--config.train.checkpoint_every=100000'
  )
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count=1 {CPU_FAST_COMPILE}'}
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  metrics = pathlib.Path(workdir, 'metrics.jsonl')
  deadline = time.time() + 120
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('\n') >= 3):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=60)[0].decode()
  assert proc.returncode == 0, out
  (line,) = [x for x in out.splitlines() if 'Stopped by SIGTERM' in x]
  step = int(line.split(' at step ')[1].split()[0])
  assert _steps(workdir) == [step]
  assert [r['step'] for r in read_metrics(workdir)][-1] == step
  # Quiet by default: none of orbax's INFO chatter, no traceback.
  assert 'Traceback' not in out and 'orbax' not in out.lower(), out


def test_9_failed_background_save_raises_not_hangs(sample_dir, tmp_path, monkeypatch):
  from orbax.checkpoint._src.path import atomicity

  async def fail(*args, **kwargs):
    raise OSError(30, 'Read-only file system (injected)')

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize', fail)
  with pytest.raises(checkpoint_lib.CheckpointError, match='Read-only file system') as e:
    train_lib.train_and_evaluate(_config(sample_dir), str(tmp_path / 'ro'))
  assert '\n' not in str(e.value)


def test_10_resume_after_a_kill_keeps_each_step_once(copy, straight, sample_dir):
  """A kill after step 5 was logged but before it was saved: metrics hold 1..5, checkpoints 2..4."""
  shutil.rmtree(os.path.join(copy, 'checkpoints', '6'))
  lines = pathlib.Path(copy, 'metrics.jsonl').read_text().splitlines(keepends=True)
  pathlib.Path(copy, 'metrics.jsonl').write_text(''.join(lines[:5]) + '{"step": 6, "lo')
  train_lib.train_and_evaluate(_config(sample_dir), copy)
  _assert_resumed_like_straight(copy, straight, 4)


def test_11_unknown_flag_is_one_line_with_the_nearest_name(tmp_path):
  proc = subprocess.run(
    [sys.executable, 'train.py', f'--workdir={tmp_path}/w', '--config.train.stepz=3'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
    'FATAL Flags parsing error: --config.train.stepz: configs/tiny.py has no field '
    "'train.stepz'; did you mean --config.train.steps?"
  )
  assert 'Traceback' not in proc.stderr
  assert not (tmp_path / 'w').exists()


def test_a_field_newer_than_the_run_resumes_at_its_default(tmp_path):
  """A run written before a config field existed resumes when the field is at its default (how
  the older version ran), and stops when it is not."""
  from configs import tiny

  new = json.loads(tiny.get_config().to_json_best_effort())
  old = json.loads(json.dumps(new))
  del old['train']['mu_dtype'], old['model']['expert_impl']  # fields "newer than the run"
  (tmp_path / workdir_lib.CONFIG).write_text(json.dumps(old))
  defaults = workdir_lib.field_defaults()
  assert new['model']['expert_impl'] == defaults['model.expert_impl']
  workdir_lib.check_identity(str(tmp_path), json.dumps(new), [], 6, write=True)
  (entry,) = [json.loads(line) for line in open(tmp_path / workdir_lib.HISTORY)]
  assert set(entry['changes']) == {'train.mu_dtype', 'model.expert_impl'}
  (tmp_path / workdir_lib.HISTORY).unlink()
  new['model']['expert_impl'] = 'einsum'  # not the default: a change like any other
  with pytest.raises(RunError, match=r"model.expert_impl: None -> 'einsum'; pass"):
    workdir_lib.check_identity(str(tmp_path), json.dumps(new), [], 6, write=False)
