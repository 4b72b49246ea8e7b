"""Checkpoints that are verified on restore: checksums, fallback to the newest good step.

orbax writes each step atomically (a temporary directory renamed into place), so a killed save
never leaves a half-written step. It does not notice a flipped byte, a truncated file or a
missing metadata file: such a step restores with different values or ends in a long traceback.
Every step saved here therefore holds three orbax items, committed together by that rename:

  state      the train state (StandardSave)
  data       the data-iterator state of every data shard (JSON)
  integrity  a checksum of every array of `state` and of `data` (JSON)

`restore_latest_good` restores the newest step whose files are complete and whose restored values
match their checksums. A step that fails gets one WARNING line naming it and the reason, and is
renamed aside into `<workdir>/checkpoints_bad/` (never deleted) before training resumes from the
newest good one. If no step is good, nothing is renamed and the run stops with one line.

The array checksum is two sums modulo 2**32 over each leaf's bits (plain, and weighted by odd
position weights, so a moved value changes it too), computed on the devices. Integer sums do not
depend on the order of reduction, so the checksum is the same under any sharding, mesh or
process count: a checkpoint verifies wherever it is restored.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from mas_jax.workdir import RunError

FORMAT = 1
BAD_DIR = 'checkpoints_bad'


class CheckpointError(RunError):
  """No checkpoint can be restored, or one cannot be saved."""


class IncompatibleCheckpoint(RunError):
  """A sound checkpoint whose arrays do not fit this run's config (other shapes or leaves)."""


class _BadCheckpoint(Exception):
  """A step whose files are damaged: the reason is the message."""


def manager(directory: str, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep, create=True, cleanup_tmp_directories=True
  )
  handlers = {
    'state': ocp.StandardCheckpointHandler(),
    'data': ocp.JsonCheckpointHandler(),
    'integrity': ocp.JsonCheckpointHandler(),
  }
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers=handlers)


def _leaf_checksum(x: jax.Array) -> jax.Array:
  """[2] uint32: sum of the bits and the odd-position-weighted sum of the bits, mod 2**32."""
  bits = x.dtype.itemsize * 8
  if bits not in (8, 16, 32):
    raise ValueError(f'cannot checksum dtype {x.dtype} ({bits}-bit)')
  unsigned = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[bits]
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  u = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)
  weights = jnp.arange(u.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
  return jnp.stack([jnp.sum(u, dtype=jnp.uint32), jnp.sum(u * weights, dtype=jnp.uint32)])


_checksums_jit = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def array_checksums(state) -> dict[str, str]:
  """{leaf path: 16 hex digits} of every array in the (sharded) state."""
  sums = jax.device_get(_checksums_jit(state))
  flat = jax.tree_util.tree_flatten_with_path(sums)[0]
  return {jax.tree_util.keystr(path): f'{int(s[0]):08x}{int(s[1]):08x}' for path, s in flat}


def json_checksum(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def save(mgr: ocp.CheckpointManager, state: dict, data: dict) -> int:
  """Saves state, data state and their checksums as one step (asynchronously); returns it."""
  step = int(jax.device_get(state['step']))
  integrity = {
    'format': FORMAT,
    'step': step,
    'arrays': array_checksums(state),
    'data': json_checksum(data),
  }
  try:
    mgr.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data),
        integrity=ocp.args.JsonSave(integrity),
      ),
    )
  except Exception as e:  # noqa: BLE001  (orbax raises anything from the filesystem)
    raise CheckpointError(f'saving step {step} in {mgr.directory} failed: {_reason(e)}') from e
  return step


def wait(mgr: ocp.CheckpointManager) -> None:
  """Waits for the background save; a failed one becomes a CheckpointError (never a hang)."""
  try:
    mgr.wait_until_finished()
    mgr.check_for_errors()
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f'a checkpoint save in {mgr.directory} failed: {_reason(e)}') from e


def _reason(e: BaseException) -> str:
  lines = [line for line in str(e).strip().splitlines() if line.strip()]
  text = lines[0] if lines else ''
  return f'{type(e).__name__}: {text[:200]}'


def _check_files(step_dir: str) -> None:
  for rel in ('state/_METADATA', 'state/manifest.ocdbt', 'data/metadata', 'integrity/metadata'):
    if not os.path.exists(os.path.join(step_dir, rel)):
      raise _BadCheckpoint(f'missing {rel}')


def _path_name(path) -> str:
  """'opt_state.1.0.mu.blocks.attn.wq': the same for a named tuple and its saved dict form."""
  parts = (getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k))) for k in path)
  return '.'.join(str(p) for p in parts)


def _check_compatible(mgr, step: int, target: dict) -> None:
  """Raises IncompatibleCheckpoint when the saved arrays are not the target's leaves/shapes."""
  try:
    meta = mgr.item_metadata(step)['state']
  except Exception as e:  # noqa: BLE001
    raise _BadCheckpoint(f'unreadable state metadata ({_reason(e)})') from e
  tree = getattr(meta, 'tree', meta)
  saved = {
    _path_name(p): (tuple(m.shape), np.dtype(m.dtype))
    for p, m in jax.tree_util.tree_flatten_with_path(tree)[0]
  }
  wanted = {
    _path_name(p): (tuple(t.shape), np.dtype(t.dtype))
    for p, t in jax.tree_util.tree_flatten_with_path(target)[0]
  }
  if saved == wanted:
    return
  diffs = [f'{k} missing in the checkpoint' for k in sorted(set(wanted) - set(saved))]
  diffs += [f'{k} not in this run' for k in sorted(set(saved) - set(wanted))]
  diffs += [
    f'{k}: saved {saved[k][0]} {saved[k][1]}, this run {wanted[k][0]} {wanted[k][1]}'
    for k in sorted(set(saved) & set(wanted))
    if saved[k] != wanted[k]
  ]
  more = f' (and {len(diffs) - 3} more)' if len(diffs) > 3 else ''
  raise IncompatibleCheckpoint(
    f'the checkpoint of step {step} in {mgr.directory} does not fit this config: '
    + '; '.join(diffs[:3])
    + more
  )


def _restore_verified(mgr, step: int, target: dict) -> tuple[dict, dict]:
  step_dir = os.path.join(str(mgr.directory), str(step))
  _check_files(step_dir)
  _check_compatible(mgr, step, target)
  try:
    restored = mgr.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        data=ocp.args.JsonRestore(),
        integrity=ocp.args.JsonRestore(),
      ),
    )
  except Exception as e:  # noqa: BLE001  (tensorstore, json, orbax: all mean a damaged step)
    raise _BadCheckpoint(f'restore failed ({_reason(e)})') from e
  integrity, data = restored['integrity'], restored['data']
  if not isinstance(integrity, dict) or integrity.get('format') != FORMAT:
    raise _BadCheckpoint('integrity record missing or of an unknown format')
  if integrity.get('step') != step:
    raise _BadCheckpoint(f'integrity record is of step {integrity.get("step")}')
  if json_checksum(data) != integrity['data']:
    raise _BadCheckpoint('data-iterator state does not match its checksum')
  actual = array_checksums(restored['state'])
  expected = integrity['arrays']
  if set(actual) != set(expected):
    raise _BadCheckpoint('integrity record lists other arrays than the state holds')
  bad = [k for k in sorted(actual) if actual[k] != expected[k]]
  if bad:
    raise _BadCheckpoint(f'checksum mismatch in {len(bad)} array(s), first {bad[0]}')
  return restored['state'], data


def verify_arrays(tree: dict, integrity, step: int) -> None:
  """Raises CheckpointError unless every array of `tree` (part of a saved state, in the same
  nesting, e.g. {'params': ...}) matches the checksum the step's integrity record holds."""
  if not isinstance(integrity, dict) or integrity.get('format') != FORMAT:
    raise CheckpointError(f'the checkpoint of step {step} has no integrity record')
  actual = array_checksums(tree)
  bad = [k for k in sorted(actual) if integrity['arrays'].get(k) != actual[k]]
  if bad:
    raise CheckpointError(
      f'the checkpoint of step {step} is damaged: checksum mismatch in {len(bad)} array(s), '
      f'first {bad[0]} (resuming it with train.py falls back to an older step)'
    )


def _agree(bad: bool) -> bool:
  """True on every process if any process found the step bad (always agree on the step)."""
  if jax.process_count() == 1:
    return bad
  from mas_jax import distributed

  return distributed.any_process(bad)


def _move_aside(mgr, step: int, workdir: str) -> str:
  """Renames checkpoints/<step> to checkpoints_bad/<step>[.n]; returns the new path."""
  src = os.path.join(str(mgr.directory), str(step))
  bad_dir = os.path.join(workdir, BAD_DIR)
  dst = os.path.join(bad_dir, str(step))
  n = 0
  while os.path.exists(dst):
    n += 1
    dst = os.path.join(bad_dir, f'{step}.{n}')
  if jax.process_index() == 0:
    os.makedirs(bad_dir, exist_ok=True)
    shutil.move(src, dst)
  return dst


def restore_latest_good(
  mgr: ocp.CheckpointManager, target: dict, workdir: str
) -> tuple[dict, dict, int] | None:
  """(state, data, step) of the newest good step, None without any step.

  Damaged newer steps are renamed aside (WARNING each); raises CheckpointError if every step is
  damaged (nothing renamed) and IncompatibleCheckpoint if a sound step does not fit the target.
  """
  steps = sorted(mgr.all_steps(), reverse=True)
  if not steps:
    return None
  failures: list[tuple[int, str]] = []
  for step in steps:
    try:
      state, data = _restore_verified(mgr, step, target)
      reason = None
    except _BadCheckpoint as e:
      state = data = None
      reason = str(e)
    if _agree(reason is not None):
      reason = reason or 'damaged on another process'
      logging.warning('Checkpoint step %d in %s is unusable: %s.', step, mgr.directory, reason)
      failures.append((step, reason))
      continue
    for bad_step, bad_reason in failures:
      dst = _move_aside(mgr, bad_step, workdir)
      logging.warning(
        'Renamed the unusable checkpoint of step %d aside to %s (%s); resuming from step %d.',
        bad_step,
        dst,
        bad_reason,
        step,
      )
    if failures:
      if jax.process_count() > 1:
        from mas_jax import distributed

        distributed.barrier('mas_jax_checkpoint_move_aside')
      mgr.reload()
    return state, data, step
  listed = '; '.join(f'step {s}: {r}' for s, r in failures)
  raise CheckpointError(
    f'no usable checkpoint in {mgr.directory} ({listed}); nothing was changed: move the '
    'checkpoints away to start afresh, or use another workdir'
  )
