"""Two JAX processes train like one: train.py on 2 x 8 CPU devices vs 1 x 16, and resumes.

Each 2-process run starts train.py twice on 127.0.0.1 (gloo collectives across the processes)
under a hard timeout; process 0 writes metrics.jsonl, compared step by step with a 1-process
16-device run of the same config (loss and eval loss within RTOL: the cross-process reductions
add in another order, so not bit for bit). The 1-process runs are `train_and_evaluate` in this
process: 16 CPU devices and the XLA flags of conftest, so the program train.py would compile
with one process. Checkpoints of either run resume in the other. Every run is made once for the
module (fixture): the 2-process runs one after another in a background thread while this process
makes the 1-process ones (a 2-process run alone keeps about 1.4 of 2 cores busy), and the
2-process runs share a compilation cache in the module's tmp dir (programs they have in common,
and all of the resumed run's, load from it). The data-sharding tests run in this process.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import socket
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
from conftest import CPU_FAST_COMPILE, tiny_config
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mas_jax import config as config_lib
from mas_jax import distributed, train_lib
from mas_jax.data.c4 import C4Source
from mas_jax.data.synthetic import SyntheticSource

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
HALF = STEPS // 2
# The tiny config, made cheap to compile: one block, short rows.
COMMON = {
  'data.source': 'synthetic',
  'model.num_layers': 1,
  'data.seq_len': 16,
  'train.steps': STEPS,
  'train.log_every': 1,
  'train.tensorboard': False,  # no TensorFlow import: about 4 s less per process
  'train.eval_every': 1000,  # evaluates once, at the last step
  'train.eval_steps': 1,
  'train.checkpoint_every': HALF,  # steps HALF and STEPS are kept
}
STRATEGIES = {
  'dp': {'parallel.strategy': 'dp'},
  'ma_sep': {
    'parallel.strategy': 'ma_sep',
    'parallel.attn_devices': 12,
    'parallel.moe_devices': 4,
  },
  'ep': {'parallel.strategy': 'ep', 'parallel.ep': 16},
}
# Data shards of the batch with 2 processes: rows split over all devices, or replicated.
DATA_SHARDS = {'dp': 2, 'ma_sep': 1, 'ep': 2}
RTOL = 1e-6
# The 2-process runs (name, strategy, the run it resumes), made one after another in this order
# (each loads the programs it shares with the ones before it from the compilation cache); the
# last waits for the 1-process dp run, made in this process when the module's turn comes.
LAUNCHES = [
  ('dp_2p', 'dp', None),
  ('ma_sep_2p', 'ma_sep', None),
  ('ep_2p', 'ep', None),
  ('dp_1p_to_2p', 'dp', 'dp_1p'),
]
# The hard timeout of one 2-process run (alone about 20-35 s on 2 cores), and of a test, which
# may wait for all of them.
RUN_TIMEOUT_S = 180
TEST_TIMEOUT_S = len(LAUNCHES) * RUN_TIMEOUT_S


def _overrides(strategy: str) -> dict:
  return {**COMMON, **STRATEGIES[strategy]}


# ---------------------------------------------------------------------------------------------
# The launcher.
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class RunFailed(AssertionError):
  pass


class PortTaken(RunFailed):
  pass


class Launch:
  """train.py started as 2 processes of 8 CPU devices each, its logs in `logdir`."""

  PROCESSES = 2

  def __init__(self, strategy: str, workdir: str, logdir: str, jax_cache: str):
    self.workdir = workdir
    self.name = os.path.basename(workdir)
    self.port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in distributed.ENV_NAMES}
    env.update(
      JAX_PLATFORMS='cpu',
      XLA_FLAGS=f'--xla_force_host_platform_device_count={16 // self.PROCESSES} {CPU_FAST_COMPILE}',
      JAX_COMPILATION_CACHE_DIR=jax_cache,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1',
    )
    flags = [f'--config.{k}={v}' for k, v in _overrides(strategy).items()]
    self.procs, self.logs = [], []
    for pid in range(self.PROCESSES):
      cmd = [
        sys.executable,
        'train.py',
        '--config=configs/tiny.py',
        *flags,
        f'--workdir={workdir}',
        f'--coordinator_address=127.0.0.1:{self.port}',
        f'--num_processes={self.PROCESSES}',
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

  def wait(self) -> dict[int, dict]:
    """Waits (hard timeout); metrics by step, or RunFailed (PortTaken) with every process's log."""
    try:
      codes = [p.wait(timeout=RUN_TIMEOUT_S) for p in self.procs]
    except subprocess.TimeoutExpired:
      codes = None
    finally:
      self.kill()
    if codes == [0] * len(self.procs):
      return read_metrics(self.workdir)
    text = '\n'.join(f'===== {path}\n{_tail(path)}' for path in self.logs)
    port_taken = 'Failed to add port' in text or 'Address already in use' in text
    what = 'timed out' if codes is None else f'exit codes {codes}'
    error = PortTaken if port_taken else RunFailed
    raise error(f'{self.name} ({len(self.procs)} processes, port {self.port}): {what}\n{text}')


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
  """The runs of this module, each made once: 2-process launches and in-process 1-process runs.

  The launches run one after another in a background thread (each loads the programs it shares
  with the ones before it, e.g. the checkpoint's shard slices, from the compilation cache; two
  processes of a launch use about 1.4 of the 2 cores), while this process makes the 1-process
  runs. A run that failed fails every test that asks for it, and only those.
  """

  def __init__(self, root: str, jax_cache: str):
    self.root, self.jax_cache = root, jax_cache
    self._results: dict[str, dict[int, dict] | Exception] = {}
    self._ready: dict[str, threading.Event] = collections.defaultdict(threading.Event)
    self._lock = threading.Lock()  # guards _ready's defaultdict, _launch and _stopped
    self._launch: Launch | None = None
    self._stopped = False
    self._thread: threading.Thread | None = None

  def workdir(self, name: str) -> str:
    return os.path.join(self.root, name)

  def _event(self, name: str) -> threading.Event:
    with self._lock:
      return self._ready[name]

  def _make(self, name: str, make) -> None:
    try:
      result = make()
    except Exception as e:  # noqa: BLE001  (raised again for each test that needs it)
      result = e
    with self._lock:
      self._results.setdefault(name, result)
      self._ready[name].set()

  def result(self, name: str, timeout: float | None = TEST_TIMEOUT_S) -> dict[int, dict]:
    """Metrics of run `name` (waits for it to be made), or the run's error."""
    if not self._event(name).wait(timeout=timeout):
      raise RunFailed(f'{name}: not finished after {timeout} s')
    if isinstance(self._results[name], Exception):
      raise self._results[name]
    return self._results[name]

  def _prepare(self, name: str, resume_from: str | None, timeout: float | None) -> str:
    """The workdir of run `name`: none yet, or run `resume_from`'s as if stopped at step HALF
    (waits for that run; its error if it failed)."""
    workdir = self.workdir(name)
    shutil.rmtree(workdir, ignore_errors=True)
    if resume_from is not None:
      self.result(resume_from, timeout)
      shutil.copytree(self.workdir(resume_from), workdir)
      shutil.rmtree(os.path.join(workdir, 'checkpoints', str(STEPS)))
    return workdir

  def one(self, name: str, strategy: str, resume_from: str | None = None) -> None:
    """Makes the 1-process run `name`: train_and_evaluate here, on the 16 CPU devices."""

    def make():
      workdir = self._prepare(name, resume_from, TEST_TIMEOUT_S)
      train_lib.train_and_evaluate(tiny_config(**_overrides(strategy)), workdir)
      return read_metrics(workdir)

    self._make(name, make)

  def _two(self, name: str, strategy: str, resume_from: str | None) -> dict[int, dict]:
    """The 2-process run `name`; a coordinator port taken meanwhile gets one retry."""
    for attempt in range(2):
      # The run it resumes may be made much later, in this process: no timeout (stop ends it).
      workdir = self._prepare(name, resume_from, None)
      with self._lock:
        if self._stopped:
          raise RunFailed(f'{name}: not started, the module is done')
        self._launch = Launch(strategy, workdir, self.root, self.jax_cache)
      try:
        return self._launch.wait()
      except PortTaken:
        if attempt:
          raise
    raise AssertionError('unreachable')

  def start(self, launches: list[tuple[str, str, str | None]]) -> None:
    """Starts the background thread that makes the 2-process runs (name, strategy, resume_from)
    in this order."""

    def run_all():
      for name, strategy, resume_from in launches:
        self._make(name, lambda a=(name, strategy, resume_from): self._two(*a))

    self._thread = threading.Thread(target=run_all, daemon=True)
    self._thread.start()

  def stop(self) -> None:
    """Kills the running launch, starts no other, and ends every wait for a run not made."""
    with self._lock:
      self._stopped = True
      if self._launch is not None:
        self._launch.kill()
      for name, ready in self._ready.items():
        if not ready.is_set():
          self._results[name] = RunFailed(f'{name}: not made, the runs were stopped')
          ready.set()
    if self._thread is not None:
      self._thread.join(timeout=60)


# The runs of the session: made by start_background_runs, which conftest calls at the start of a
# one-process session that selected tests using the `runs` fixture (under xdist the `runs`
# fixture calls it, and conftest sends this file first).
_SESSION_RUNS: list[Runs] = []


def start_background_runs(tmp_path_factory) -> None:
  """Starts the 2-process runs in a background thread (once per session). Called at the start of
  a one-process session, they go on beside the test files before this one, which keep about one
  of two cores busy, instead of after them."""
  if not _SESSION_RUNS:
    root = str(tmp_path_factory.mktemp('multiprocess'))
    _SESSION_RUNS.append(Runs(root, jax_cache=os.path.join(root, 'jax_cache')))
    _SESSION_RUNS[0].start(LAUNCHES)


def stop_background_runs() -> None:
  for runs in _SESSION_RUNS:
    runs.stop()


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """The 2-process runs, started at the start of the session (or now), and the 1-process runs,
  made here while the last 2-process run (which resumes one of them) goes on."""
  start_background_runs(tmp_path_factory)
  runs = _SESSION_RUNS[0]
  try:
    for strategy in STRATEGIES:
      runs.one(f'{strategy}_1p', strategy)
    runs.one('dp_2p_to_1p', 'dp', resume_from='dp_2p')
    yield runs
  finally:
    stop_background_runs()


# ---------------------------------------------------------------------------------------------
# 2 processes == 1 process.
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(TEST_TIMEOUT_S)
@pytest.mark.parametrize('strategy', list(STRATEGIES))
def test_two_processes_train_like_one(runs, strategy):
  one = runs.result(f'{strategy}_1p')
  two = runs.result(f'{strategy}_2p')
  assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
  assert_losses_close(two, one, range(1, STEPS + 1))
  # Both processes wrote their part of the checkpoint, and its data state holds every shard.
  step_dir = os.path.join(runs.workdir(f'{strategy}_2p'), 'checkpoints', str(STEPS))
  assert os.path.exists(os.path.join(step_dir, 'state', 'ocdbt.process_1'))
  with open(os.path.join(step_dir, 'data', 'metadata')) as f:
    shards = DATA_SHARDS[strategy]
    assert json.load(f) == {'shard_count': shards, 'shards': [{'index': STEPS}] * shards}


@pytest.mark.timeout(TEST_TIMEOUT_S)
@pytest.mark.parametrize('move', ['2p_to_1p', '1p_to_2p'])
def test_checkpoint_resumes_with_another_process_count(runs, move):
  """The straight run of one process count, stopped at step HALF, resumed with the other."""
  straight = runs.result('dp_1p')
  resumed = runs.result(f'dp_{move}')
  assert sorted(resumed) == list(range(1, STEPS + 1))  # 1..HALF kept from the run it resumes
  assert_losses_close(resumed, straight, range(HALF + 1, STEPS + 1))


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
