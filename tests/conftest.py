"""Test set-up: 16 fake CPU devices (before JAX starts), strict rank promotion, shared fixtures."""

import os

# LLVM's -O0 for the CPU code: compiles about a third faster, and every test compares programs
# compiled alike (XLA's own passes, sharding and collectives included, are unchanged).
CPU_FAST_COMPILE = '--xla_backend_optimization_level=0'
os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count=16 {CPU_FAST_COMPILE}'
)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_NUMPY_RANK_PROMOTION', 'raise')

import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Many tests compile the same programs again (every train_and_evaluate run builds new jitted
# functions): JAX's persistent compilation cache turns those recompiles into cache hits.
# Subprocesses started by tests inherit the directory through the environment variable.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='mas_jax_jit_cache_'))
jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)

from configs import tiny  # noqa: E402


@pytest.fixture(scope='session')
def sample_dir(tmp_path_factory) -> str:
  """A TFDS data_dir holding the embedded C4 sample and its tokenizer, built once per session:
  the xdist workers share one (the first builds it under a file lock; about 20 s of CPU each)."""
  import fcntl

  from mas_jax import config as config_lib
  from mas_jax.data import sample
  from mas_jax.data.c4 import C4Source

  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent  # this session's directory, shared by its workers
  data_dir = str(root / 'shared_tfds')
  with open(str(root / 'shared_tfds.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    built = str(root / 'shared_tfds.built')
    if not os.path.exists(built):
      os.makedirs(data_dir, exist_ok=True)
      cd = tiny.get_config()
      cd.data.data_dir = data_dir
      sample.build(data_dir, cd.data.version)
      C4Source(config_lib.from_config_dict(cd).data, cd.model.vocab_size, seed=0)
      with open(built, 'w') as f:
        f.write('built\n')
  return data_dir


@pytest.fixture(scope='session', autouse=True)
def _background_runs(request, tmp_path_factory):
  """Starts the 2-process runs of tests/test_multiprocess.py when the session starts, if tests
  using them are selected: in one process (`-n 0`) they then go on beside the test files before
  it instead of after them; its tests check them when their turn comes.

  Not in an xdist worker: every worker collects every test, and the one that starts them
  cannot know whether it will be sent test_multiprocess.py, so the other worker's runs were
  CPU spent for nothing (3 of the 4 launches ran to the end beside its files). There the module
  starts them itself (its `runs` fixture), and it is the first file sent (LONGEST_FIRST)."""
  modules = set()
  if not os.environ.get('PYTEST_XDIST_WORKER'):
    modules = {
      item.module
      for item in request.session.items
      if hasattr(getattr(item, 'module', None), 'start_background_runs')
      and 'runs' in getattr(item, 'fixturenames', ())
    }
  for module in modules:
    module.start_background_runs(tmp_path_factory)
  yield
  for module in modules:
    module.stop_background_runs()


def compile_train_step_for_many_steps(config, layout, tx, shardings, state):
  """train_lib.compile_train_step with LLVM's optimisations on (level 2, not CPU_FAST_COMPILE's
  0), for tests that run it for many steps: about 4 s more CPU to compile the tiny model's dp
  step, half the CPU per step. The same HLO and XLA passes either way."""
  from mas_jax import train_lib

  options = {'xla_backend_optimization_level': 2}
  return train_lib.compile_train_step(config, layout, tx, shardings, state, options)


def tiny_config(**overrides):
  """configs/tiny.py with dotted overrides, e.g. tiny_config(**{'train.steps': 3})."""
  cd = tiny.get_config()
  for dotted, value in overrides.items():
    section, field = dotted.split('.') if '.' in dotted else (None, dotted)
    (cd[section] if section else cd)[field] = value
  return cd


def assert_trees_close(actual, expected, rtol: float, atol: float = 0.0) -> None:
  """Leaf-wise allclose that names the worst leaf and its max abs / relative difference."""
  import numpy as np

  flat_a = jax.tree_util.tree_flatten_with_path(actual)[0]
  flat_e = jax.tree_util.tree_flatten_with_path(expected)[0]
  assert len(flat_a) == len(flat_e), (len(flat_a), len(flat_e))
  for (path, a), (_, e) in zip(flat_a, flat_e, strict=True):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    diff = np.abs(a - e)
    scale = np.max(np.abs(e)) + 1e-30
    ok = np.all(diff <= atol + rtol * scale)
    assert ok, (
      f'{jax.tree_util.keystr(path)}: max|diff|={diff.max():.3g}, '
      f'relative to max|expected|={diff.max() / scale:.3g} > rtol={rtol}'
    )


def read_metrics(workdir: str) -> list[dict]:
  """The records of <workdir>/metrics.jsonl, in order."""
  import json

  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def restore_state(workdir: str, step: int) -> dict:
  """The train state of checkpoint `step` in <workdir>/checkpoints, as saved (no target)."""
  import orbax.checkpoint as ocp

  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as mgr:
    return mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']


# The two xdist workers take whole files in this order (pyproject.toml's --no-loadscope-reorder:
# xdist's default reorder sorts files by their number of tests, which sent the 1-test, 80 s
# tests/test_compression_learning.py last). Longest first by the seconds each took in a full
# run (2026-11-25, in the comments), so that the short files even out the two workers at the
# end; test_multiprocess.py first of all: its 2-process runs go on in the background while its own
# 1-process runs are made (about 1.4 + 1 cores), beside the longest file on the other worker.
LONGEST_FIRST = (
  'test_multiprocess.py',  # 63, mostly waiting on its 2-process runs
  'test_perf_fidelity.py',  # 239
  'test_ma_separation.py',  # 139
  'test_shard_optimizer.py',  # 133
  'test_bench_smoke.py',  # 130
  'test_decode.py',  # 115
  'test_compression.py',  # 106
  'test_rebalance.py',  # 93
  'test_compression_learning.py',  # 80
  'test_train.py',  # 75
  'test_tp_pp.py',  # 72
  'test_faults.py',  # 69
  'test_attn_sharding.py',  # 68
  'test_optimizer_levers.py',  # 68
  'test_generate.py',  # 56
  'test_grouped_matmul.py',  # 31
  'test_attention.py',  # 30
  'test_decode_baselines.py',  # 27
  'test_model.py',  # 22
  'test_ep.py',  # 20
  'test_gmm_2wg.py',  # 19
  'test_auto_split.py',  # 14
  'test_golden.py',  # 13
  'test_data.py',  # 11
  'test_dp.py',  # 11
  'test_perf_model.py',  # 8
)


def pytest_collection_modifyitems(items):
  def rank(item):
    name = os.path.basename(str(item.fspath))
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

  items.sort(key=rank)  # stable: the order inside a file, and of the other files, is kept
