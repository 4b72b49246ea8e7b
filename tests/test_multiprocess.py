"""Two JAX processes train like one: train.py on 2 x 8 CPU devices vs 1 x 16, and resumes.

Each 2-process run starts train.py twice on 127.0.0.1 (gloo collectives across the processes)
under a hard timeout; process 0 writes metrics.jsonl, compared step by step with a 1-process
16-device run of the same config (loss and eval loss within RTOL: the cross-process reductions
add in another order, so not bit for bit). Checkpoints of either run resume in the other. Runs
are shared between tests (module fixture), runs asked for together run side by side, and all use
a compilation cache in the module's tmp dir (the resumed runs load the programs of the runs they
resume). The data-sharding tests run in this process.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import tiny_config
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mas_jax import config as config_lib
from mas_jax import distributed
from mas_jax.data.c4 import C4Source
from mas_jax.data.synthetic import SyntheticSource

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 10
RUN_TIMEOUT_S = 150
# The tiny config, made cheap to compile: one block, short rows.
COMMON = [
  '--config=configs/tiny.py',
  '--config.data.source=synthetic',
  '--config.model.num_layers=1',
  '--config.data.seq_len=16',
  f'--config.train.steps={STEPS}',
  '--config.train.log_every=1',
  '--config.train.tensorboard=False',  # no TensorFlow import: about 4 s less per run
  '--config.train.eval_every=1000',  # evaluates once, at the last step
  '--config.train.eval_steps=1',
  '--config.train.checkpoint_every=5',  # steps 5 and 10 are kept
]
STRATEGIES = {
  'dp': ['--config.parallel.strategy=dp'],
  'ma_sep': [
    '--config.parallel.strategy=ma_sep',
    '--config.parallel.attn_devices=12',
    '--config.parallel.moe_devices=4',
  ],
  'ep': ['--config.parallel.strategy=ep', '--config.parallel.ep=16'],
}
# Data shards of the batch with 2 processes: rows split over all devices, or replicated.
DATA_SHARDS = {'dp': 2, 'ma_sep': 1, 'ep': 2}
RTOL = 1e-6


# ---------------------------------------------------------------------------------------------
# The launcher.
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class RunFailed(AssertionError):
  pass


class Launch:
  """train.py started as `processes` processes (16 devices in all), its logs in `logdir`."""

  def __init__(self, flags: list[str], workdir: str, logdir: str, processes: int, jax_cache: str):
    self.args = (flags, workdir, logdir, processes, jax_cache)
    self.name = os.path.basename(workdir)
    self.port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in distributed.ENV_NAMES}
    env.update(
      JAX_PLATFORMS='cpu',
      # LLVM's optimisation level 0 compiles about a third faster (XLA's HLO passes, SPMD
      # partitioning and collectives included, are unchanged).
      XLA_FLAGS=f'--xla_force_host_platform_device_count={16 // processes} '
      '--xla_backend_optimization_level=0',
      JAX_COMPILATION_CACHE_DIR=jax_cache,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1',
    )
    self.procs, self.logs = [], []
    for pid in range(processes):
      cmd = [sys.executable, 'train.py', *flags, f'--workdir={workdir}']
      if processes > 1:
        cmd += [
          f'--coordinator_address=127.0.0.1:{self.port}',
          f'--num_processes={processes}',
          f'--process_id={pid}',
        ]
      self.logs.append(os.path.join(logdir, f'{self.name}.p{pid}.log'))
      with open(self.logs[-1], 'w') as log:
        self.procs.append(
          subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        )

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()

  def wait(self, retry: bool = True) -> dict[int, dict]:
    """Waits (hard timeout); metrics by step, or RunFailed with every process's log.

    A coordinator port taken between choosing and binding it gets one retry on a new port.
    """
    try:
      codes = [p.wait(timeout=RUN_TIMEOUT_S) for p in self.procs]
    except subprocess.TimeoutExpired:
      codes = None
    finally:
      self.kill()
    if codes == [0] * len(self.procs):
      return read_metrics(self.args[1])
    text = '\n'.join(f'===== {path}\n{_tail(path)}' for path in self.logs)
    port_taken = 'Failed to add port' in text or 'Address already in use' in text
    if retry and len(self.procs) > 1 and port_taken:
      shutil.rmtree(self.args[1], ignore_errors=True)
      return Launch(*self.args).wait(retry=False)
    what = 'timed out' if codes is None else f'exit codes {codes}'
    raise RunFailed(f'{self.name} ({len(self.procs)} processes, port {self.port}): {what}\n{text}')


def _tail(path: str, chars: int = 6000) -> str:
  with open(path) as f:
    return f.read()[-chars:]


def read_metrics(workdir: str) -> dict[int, dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r for r in map(json.loads, f)}


def assert_losses_close(actual: dict, expected: dict, steps) -> None:
  """loss at every step (and eval_loss where logged) equal within RTOL, relative."""
  for step in steps:
    for key in ('loss', 'eval_loss'):
      if key not in expected[step]:
        continue
      a, e = actual[step][key], expected[step][key]
      assert abs(a - e) <= RTOL * abs(e), f'step {step} {key}: {a!r} vs {e!r} ({a / e - 1:.2e})'


class Runs:
  """train.py runs of this module, each made once on first use.

  Runs asked for in one call run side by side: on 2 cores a 1-process run leaves one mostly idle.
  """

  def __init__(self, root: str, jax_cache: str):
    self.root, self.jax_cache = root, jax_cache
    self._metrics: dict[str, dict] = {}

  def workdir(self, name: str) -> str:
    return os.path.join(self.root, name)

  def _run(self, launches: dict[str, Launch]) -> None:
    try:
      for name, launch in launches.items():
        self._metrics[name] = launch.wait()
    finally:
      for launch in launches.values():
        launch.kill()

  def straight(self, strategy: str, *processes: int) -> list[dict[int, dict]]:
    """Metrics of STEPS steps from scratch with each number of processes."""
    names = [f'{strategy}_{n}p' for n in processes]
    flags = COMMON + STRATEGIES[strategy]
    self._run(
      {
        name: Launch(flags, self.workdir(name), self.root, n, self.jax_cache)
        for name, n in zip(names, processes, strict=True)
        if name not in self._metrics
      }
    )
    return [self._metrics[name] for name in names]

  def resumed(self, strategy: str, *moves: tuple[int, int]) -> list[dict[int, dict]]:
    """Metrics of resuming straight runs from their step-5 checkpoint, for each (from, to).

    The straight run of `from` processes is copied without its last checkpoint and resumed with
    `to` processes: steps 6..STEPS, after 1..5 of the straight run.
    """
    self.straight(strategy, *sorted({a for a, _ in moves}))
    launches = {}
    for a, b in moves:
      workdir = self.workdir(f'{strategy}_{a}p_to_{b}p')
      shutil.copytree(self.workdir(f'{strategy}_{a}p'), workdir)
      shutil.rmtree(os.path.join(workdir, 'checkpoints', str(STEPS)))  # as if stopped at 5
      launches[os.path.basename(workdir)] = Launch(
        COMMON + STRATEGIES[strategy], workdir, self.root, b, self.jax_cache
      )
    self._run(launches)
    return [self._metrics[name] for name in launches]


@pytest.fixture(scope='module')
def runs(tmp_path_factory) -> Runs:
  root = str(tmp_path_factory.mktemp('multiprocess'))
  return Runs(root, jax_cache=os.path.join(root, 'jax_cache'))


# ---------------------------------------------------------------------------------------------
# 2 processes == 1 process.
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(2 * RUN_TIMEOUT_S)
@pytest.mark.parametrize('strategy', list(STRATEGIES))
def test_two_processes_train_like_one(runs, strategy):
  one, two = runs.straight(strategy, 1, 2)
  assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
  assert_losses_close(two, one, range(1, STEPS + 1))
  # Both processes wrote their part of the checkpoint, and its data state holds every shard.
  step_dir = os.path.join(runs.workdir(f'{strategy}_2p'), 'checkpoints', str(STEPS))
  assert os.path.exists(os.path.join(step_dir, 'state', 'ocdbt.process_1'))
  with open(os.path.join(step_dir, 'data', 'metadata')) as f:
    shards = DATA_SHARDS[strategy]
    assert json.load(f) == {'shard_count': shards, 'shards': [{'index': STEPS}] * shards}


@pytest.fixture(scope='module')
def dp_resumed(runs) -> dict[str, dict]:
  two_to_one, one_to_two = runs.resumed('dp', (2, 1), (1, 2))
  return {'2p_to_1p': two_to_one, '1p_to_2p': one_to_two}


@pytest.mark.timeout(4 * RUN_TIMEOUT_S)
@pytest.mark.parametrize('move', ['2p_to_1p', '1p_to_2p'])
def test_checkpoint_resumes_with_another_process_count(runs, dp_resumed, move):
  resumed = dp_resumed[move]
  assert sorted(resumed) == list(range(1, STEPS + 1))  # 1..5 kept from the run it resumes
  (straight,) = runs.straight('dp', 1)
  assert_losses_close(resumed, straight, range(6, STEPS + 1))


# ---------------------------------------------------------------------------------------------
# Data shards (in this process).
# ---------------------------------------------------------------------------------------------


def test_data_shard_of_one_process():
  mesh = jax.make_mesh((16,), ('d',), axis_types=(jax.sharding.AxisType.Auto,))
  for spec in (P(), P('d')):
    assert distributed.data_shard(NamedSharding(mesh, spec), (16, 9)) == (0, 1)
  with pytest.raises(ValueError, match='splits axis 1'):
    distributed.data_shard(NamedSharding(mesh, P(None, 'd')), (4, 16))


def test_row_blocks_of_several_processes():
  # dp over 16 devices of 2 processes: two blocks of 8 rows.
  split = {0: [(i, i + 1) for i in range(8)], 1: [(i, i + 1) for i in range(8, 16)]}
  assert distributed.row_blocks(split, 16) == {0: (0, 8), 1: (8, 16)}
  # Replicated: every process holds the whole batch.
  assert distributed.row_blocks({0: [(0, 16)] * 8, 1: [(0, 16)] * 8}, 16) == {
    0: (0, 16),
    1: (0, 16),
  }
  with pytest.raises(ValueError, match='not one contiguous block'):
    distributed.row_blocks({0: [(0, 4), (8, 12)], 1: [(4, 8), (12, 16)]}, 16)
  with pytest.raises(ValueError, match='equal, disjoint blocks'):
    distributed.row_blocks({0: [(0, 12)], 1: [(12, 16)]}, 16)
  with pytest.raises(ValueError, match='equal, disjoint blocks'):
    distributed.row_blocks({0: [(0, 8)], 1: [(4, 12)]}, 16)


def test_synthetic_shards_make_the_one_shard_batch():
  cfg = config_lib.from_config_dict(tiny_config(**{'data.batch_size': 8, 'data.seq_len': 4}))
  whole = SyntheticSource(cfg.data, 512, seed=3)
  halves = [SyntheticSource(cfg.data, 512, seed=3, shard_index=i, shard_count=2) for i in (0, 1)]
  batch, state = next(whole.train_batches())
  parts = [next(h.train_batches()) for h in halves]
  np.testing.assert_array_equal(np.concatenate([b for b, _ in parts]), batch)
  assert [s for _, s in parts] == [state, state] == [{'index': 1}, {'index': 1}]
  np.testing.assert_array_equal(
    np.concatenate([next(h.eval_batches(1)) for h in halves]), next(whole.eval_batches(1))
  )


def test_c4_shards_read_disjoint_documents_covering_the_split(sample_dir):
  cfg = config_lib.from_config_dict(tiny_config(**{'data.data_dir': sample_dir})).data
  for split in (cfg.train_split, cfg.eval_split):
    docs = [
      collections.Counter(
        C4Source(cfg, 512, seed=0, shard_index=i, shard_count=2)._texts(
          split, shuffle=False, repeat=False
        )
      )
      for i in (0, 1)
    ]
    whole = collections.Counter(
      C4Source(cfg, 512, seed=0)._texts(split, shuffle=False, repeat=False)
    )
    # The sample repeats a few texts, so documents are compared as multisets: every document of
    # the split is read by exactly one shard, and the shards split it about in half.
    assert docs[0] + docs[1] == whole, split
    sizes = [d.total() for d in docs]
    assert abs(sizes[0] - sizes[1]) <= 1, (split, sizes)


def test_data_state_gather_and_select_with_one_process():
  state = {'docs': 3, 'leftover': np.arange(4, dtype=np.int32)}
  saved = distributed.gather_data_state(state, 0, 1)
  assert saved == {'shard_count': 1, 'shards': [{'docs': 3, 'leftover': [0, 1, 2, 3]}]}
  assert json.loads(json.dumps(saved)) == saved
  assert distributed.select_data_state(saved, 0, 1) == saved['shards'][0]
  # A global state (synthetic) resumes with another shard count; per-shard states do not.
  synthetic = {'shard_count': 2, 'shards': [{'index': 5}, {'index': 5}]}
  assert distributed.select_data_state(synthetic, 0, 1) == {'index': 5}
  c4 = {'shard_count': 2, 'shards': [{'docs': 5, 'leftover': []}, {'docs': 6, 'leftover': []}]}
  with pytest.raises(ValueError, match='2 data shards, this run reads 1'):
    distributed.select_data_state(c4, 0, 1)
  assert distributed.any_process(True) and not distributed.any_process(False)
  distributed.barrier('one process')
