"""Several JAX processes: start-up, which rows of the batch each process reads, shared state.

A multi-process run is `jax.distributed.initialize` plus three rules that keep it equal to a
single-process run of the same config:

- The data is split per *data shard*, not per process. A shard is a block of rows of the global
  batch [B, T + 1]; processes whose devices hold the same rows read the same shard. A replicated
  batch (`P()`: ma_sep, tp_pp) has one shard that every process reads whole; `dp` and `ep` split
  rows over all devices, so with 2 processes each reads half the rows (`data_shard`).
  `reference` runs on device 0 alone and cannot span processes.
- Each process hands its block to `to_global`, which places it on its own devices.
- The data state of a checkpoint holds every shard's state (`gather_data_state`), and a
  resumed run picks its own (`select_data_state`), also when the shard count changed and the
  state does not depend on it (the synthetic source's).

With one process every function here is cheap and needs no collective.
"""

from __future__ import annotations

import collections
import json
import os

import jax
import numpy as np
from absl import logging

from mas_jax.config import ConfigError

# Environment variables read when the flag is not given. JAX 0.10 itself reads only
# JAX_COORDINATOR_ADDRESS (and JAX_COORDINATOR_BIND_ADDRESS); the other two are ours.
ENV_ADDRESS = 'JAX_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAX_PROCESS_ID'
ENV_NAMES = (ENV_ADDRESS, ENV_NUM_PROCESSES, ENV_PROCESS_ID, 'JAX_COORDINATOR_BIND_ADDRESS')

_LOOPBACK_HOSTS = ('localhost', '127.0.0.1', '[::1]', '::1')


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None or value == '':
    return None
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f'{name}={value!r} is not an integer') from None


def initialize(
  coordinator_address: str | None,
  num_processes: int | None,
  process_id: int | None,
  *,
  initialization_timeout_s: int = 120,
  heartbeat_timeout_s: int = 30,
) -> None:
  """Joins the processes of a multi-process run; call it before any other JAX call.

  Each argument that is None is read from its environment variable (JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES, JAX_PROCESS_ID). With none of the three set this does nothing but log the
  topology: a single-process run. A coordinator on a loopback address listens only there; any
  other address keeps JAX's default of listening on all interfaces at its port (a host name may
  resolve to a loopback address on its own machine). JAX_COORDINATOR_BIND_ADDRESS overrides both.

  Args:
    coordinator_address: 'host:port' of process 0.
    num_processes: processes in the run.
    process_id: this process, 0..num_processes - 1.
    initialization_timeout_s: how long to wait for every process to connect.
    heartbeat_timeout_s: a process silent this long is dead, and every other process aborts
      (an abort, not a Python exception: run the processes under a supervisor).

  Raises:
    ConfigError: only some of the three are set, or they do not fit together.
  """
  address = coordinator_address or os.environ.get(ENV_ADDRESS) or None
  count = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
  pid = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
  given = (address, count, pid)
  if all(v is None for v in given):
    _log_topology()
    return
  if any(v is None for v in given):
    raise ConfigError(
      f'a multi-process run needs all of coordinator_address={address!r}, '
      f'num_processes={count}, process_id={pid} (flags or {ENV_ADDRESS}, {ENV_NUM_PROCESSES}, '
      f'{ENV_PROCESS_ID})'
    )
  host, _, port = address.rpartition(':')
  if not host or not port.isdigit():
    raise ConfigError(f'coordinator_address={address!r} is not host:port')
  if count < 1 or not 0 <= pid < count:
    raise ConfigError(f'process_id={pid} is not in 0..num_processes-1 (num_processes={count})')
  bind = os.environ.get('JAX_COORDINATOR_BIND_ADDRESS')
  if bind is None and host in _LOOPBACK_HOSTS:
    bind = address
  jax.distributed.initialize(
    coordinator_address=address,
    num_processes=count,
    process_id=pid,
    coordinator_bind_address=bind,
    initialization_timeout=initialization_timeout_s,
    heartbeat_timeout_seconds=heartbeat_timeout_s,
  )
  if jax.process_count() != count or jax.process_index() != pid:
    raise ConfigError(
      f'jax.distributed joined process {jax.process_index()} of {jax.process_count()}, '
      f'not process_id={pid} of num_processes={count}'
    )
  _log_topology()


def _log_topology() -> None:
  """Logs processes and devices in one line; all processes must hold equally many devices."""
  per_process = collections.Counter(d.process_index for d in jax.devices())
  if len(set(per_process.values())) > 1:
    raise ConfigError(
      f'processes hold different device counts {dict(sorted(per_process.items()))} '
      '(e.g. different XLA_FLAGS=--xla_force_host_platform_device_count)'
    )
  logging.info(
    'JAX %s: process %d of %d, %d local of %d devices (%s).',
    jax.__version__,
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].device_kind,
  )


# ---------------------------------------------------------------------------------------------
# The batch: which rows each process reads.
# ---------------------------------------------------------------------------------------------


def row_blocks(
  rows_by_process: dict[int, list[tuple[int, int]]], batch_size: int
) -> dict[int, tuple[int, int]]:
  """Each process's block of rows [start, stop), from the row ranges its devices hold.

  Args:
    rows_by_process: process -> the [start, stop) row range of each of its devices.
    batch_size: rows of the global batch.

  Returns:
    process -> its block. Blocks are equal or disjoint, all the same size, and cover the batch.

  Raises:
    ConfigError (a ValueError): a process's rows are not one block, or the blocks are unequal
      or overlap.
  """
  blocks = {}
  for process, ranges in rows_by_process.items():
    start, stop = min(r[0] for r in ranges), max(r[1] for r in ranges)
    covered = np.zeros(stop - start, bool)
    for a, b in ranges:
      covered[a - start : b - start] = True
    if not covered.all():
      raise ConfigError(
        f'process {process} holds rows {sorted(set(ranges))} of the batch, not one contiguous '
        'block: it cannot read them as one slice of the data'
      )
    blocks[process] = (start, stop)
  distinct = sorted(set(blocks.values()))
  size = batch_size // len(distinct)
  if distinct != [(i * size, (i + 1) * size) for i in range(len(distinct))] or (
    size * len(distinct) != batch_size
  ):
    raise ConfigError(
      f'the processes hold row blocks {distinct} of a batch of {batch_size} rows; data sharding '
      'needs equal, disjoint blocks that cover the batch'
    )
  return blocks


def data_shard(sharding: jax.sharding.Sharding, global_shape: tuple[int, ...]) -> tuple[int, int]:
  """(this process's data shard, number of shards) of a batch laid out by `sharding`.

  Processes holding the same block of rows of the global batch share a shard: a replicated
  sharding gives (0, 1) on every process; rows split over 16 devices of 2 processes give
  (process, 2). Only the leading (row) axis may be split.

  Raises:
    ConfigError (a ValueError): a process's rows are not one contiguous block, the blocks
      differ in size or overlap, the sharding splits another axis, or this process holds none
      of its devices (e.g. `reference`, which runs on device 0 only).
  """
  rows_by_process: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
  for device, index in sharding.devices_indices_map(tuple(global_shape)).items():
    rows, *rest = index
    for axis, s in enumerate(rest, start=1):
      if s.indices(global_shape[axis]) != (0, global_shape[axis], 1):
        raise ConfigError(f'batch sharding {sharding} splits axis {axis}; only rows may be split')
    start, stop, _ = rows.indices(global_shape[0])
    rows_by_process[device.process_index].append((start, stop))
  if jax.process_index() not in rows_by_process:
    raise ConfigError(
      f"process {jax.process_index()} holds none of the batch sharding's devices "
      f'(processes {sorted(rows_by_process)} do): the strategy must span every process'
    )
  blocks = row_blocks(rows_by_process, global_shape[0])
  distinct = sorted(set(blocks.values()))
  return distinct.index(blocks[jax.process_index()]), len(distinct)


def to_global(
  host_rows: np.ndarray, sharding: jax.sharding.Sharding, global_shape: tuple[int, ...]
) -> jax.Array:
  """This process's block of rows (its data shard) -> the global batch array.

  Args:
    host_rows: [global_shape[0] / shard_count, ...], the rows of this process's shard.
    sharding: the batch sharding (rows split or replicated).
    global_shape: shape of the global batch.
  """
  return jax.make_array_from_process_local_data(sharding, host_rows, tuple(global_shape))


# ---------------------------------------------------------------------------------------------
# Data state in checkpoints, and agreement between processes.
# ---------------------------------------------------------------------------------------------


def _jsonable(value):
  """numpy arrays and scalars (e.g. C4's leftover tokens) -> lists and Python numbers."""
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.ndarray | np.generic):
    return value.tolist()
  return value


def gather_data_state(state: dict, shard_index: int, shard_count: int) -> dict:
  """Every shard's data state, on every process: {'shard_count': n, 'shards': [s_0, ...]}.

  A collective with several processes (call it on all of them, at the same point); with one
  process just a JSON conversion. The result is JSON-serialisable: numpy arrays become lists.
  `state` may be None (no batch read yet).

  Raises:
    ValueError: two processes of one shard hold different states (they were fed different
      rows of a replicated batch), or a shard has no process.
  """
  payload = {'shard': shard_index, 'state': _jsonable(state)}
  if jax.process_count() == 1:
    if shard_count != 1:
      raise ValueError(f'one process cannot hold shard {shard_index} of {shard_count}')
    return {'shard_count': 1, 'shards': [payload['state']]}
  from jax.experimental import multihost_utils

  data = np.frombuffer(json.dumps(payload).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([data.size], np.int32))  # [P, 1]
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[: data.size] = data
  everyone = multihost_utils.process_allgather(padded)  # [P, max size]
  shards: dict[int, dict] = {}
  for process, (size, row) in enumerate(zip(sizes[:, 0], everyone, strict=True)):
    got = json.loads(bytes(row[:size]).decode())
    first = shards.setdefault(got['shard'], got['state'])
    if got['state'] != first:
      raise ValueError(
        f'process {process} holds another data state of shard {got["shard"]} than an earlier '
        'process of that shard: they read different rows of the same block'
      )
  if sorted(shards) != list(range(shard_count)):
    raise ValueError(f'gathered data states of shards {sorted(shards)}, expected {shard_count}')
  return {'shard_count': shard_count, 'shards': [shards[i] for i in range(shard_count)]}


def select_data_state(saved: dict, shard_index: int, shard_count: int) -> dict:
  """This shard's data state from `gather_data_state`'s dict (as read back from JSON).

  When the saved shard count differs, the saved state is usable only if it does not depend on
  the split, i.e. all shards saved the same state (the synthetic source's global batch index).

  Raises:
    ConfigError (a ValueError): the shard count changed and the saved shards' states differ.
  """
  shards = saved['shards']
  if int(saved['shard_count']) == shard_count:
    return shards[shard_index]
  if all(s == shards[0] for s in shards):
    return shards[0]
  raise ConfigError(
    f'the checkpoint holds the data state of {saved["shard_count"]} data shards, this run '
    f'reads {shard_count}: the per-shard states differ, so the data cannot resume exactly'
  )


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name`; nothing with one process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """True when `flag` is set on any process (a collective: call it on all of them)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils

  return bool(np.any(multihost_utils.process_allgather(np.array(bool(flag)))))
