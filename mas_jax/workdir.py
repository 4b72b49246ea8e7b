"""A workdir belongs to one run: a lock, the run's identity (its config), and its metric lines.

- `WorkdirLock`: `<workdir>/.lock`, an exclusive `flock` held for the whole run. The kernel
  releases it when the process dies, so a lock left by a killed run is taken over (one WARNING
  line names the dead PID); a live holder stops a second run with one line naming its PID.
- `check_identity`: `config.json` is written by the first run and never overwritten. A resume
  whose config differs from the run's current config in a field not in `SAFE_TO_CHANGE` stops
  with one line listing the fields, unless `--resume_changed` names them. A field the run's
  config does not have (written by a version of mas-jax before the field existed) is no change
  when it is at its default, which is how that version ran (new fields default to the old
  behaviour); any other value of it is a change like the rest. Every accepted change is appended
  to `config_history.jsonl` (time, step, each field's old and new value, and the whole config now
  in effect, against which the next resume is compared).
- `truncate_metrics`: on resume, `metrics.jsonl` keeps only the lines up to the restored step,
  so every step appears once.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
import time
import typing

from absl import logging

CONFIG = 'config.json'
HISTORY = 'config_history.jsonl'
METRICS = 'metrics.jsonl'
LOCK = '.lock'

# Fields a resumed run may change without --resume_changed: they change what is logged, saved
# or evaluated, or how long the run is (train.steps also stretches the cosine schedule).
SAFE_TO_CHANGE = (
  'train.steps',
  'train.log_every',
  'train.eval_every',
  'train.eval_steps',
  'train.checkpoint_every',
  'train.keep_checkpoints',
  'train.tensorboard',
  'data.prefetch',
  # What the planner models for parallel.*='auto'; the splits it resolves are compared anyway.
  'parallel.hardware',
  # Where the optimizer state lives, not what it holds: the checkpoint is converted on restore.
  'parallel.shard_optimizer',
  'parallel.shard_gradients',
  # How the output head's cross entropy is computed, not what (the same loss and gradients).
  'model.loss_chunk',
)


class RunError(Exception):
  """A run that cannot start or go on; the message is one line for the user."""


class WorkdirLock:
  """An exclusive lock on a workdir for the life of a run (a context manager)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK)
    self._fd: int | None = None

  def acquire(self) -> None:
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 4096).decode(errors='replace').strip() or 'unknown'
      os.close(fd)
      raise RunError(
        f'workdir {os.path.dirname(self.path)} is in use by another run ({holder}); '
        'wait for it or use another --workdir'
      ) from None
    previous = os.read(fd, 4096).decode(errors='replace').strip()
    if previous:
      logging.warning(
        'Took over the stale lock of %s (that process is gone) on %s.', previous, self.path
      )
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'PID {os.getpid()} on {socket.gethostname()}\n'.encode(), 0)
    os.fsync(fd)
    self._fd = fd

  def release(self) -> None:
    if self._fd is None:
      return
    os.ftruncate(self._fd, 0)  # an empty lock file means "released cleanly"
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()


def _flatten(tree: dict, prefix: str = '') -> dict:
  out = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, dict):
      out.update(_flatten(value, name + '.'))
    else:
      out[name] = value
  return out


def current_config(workdir: str) -> dict | None:
  """The config in effect for the workdir's run: the last accepted one, or config.json."""
  history = os.path.join(workdir, HISTORY)
  if os.path.exists(history):
    with open(history) as f:
      lines = [line for line in f if line.strip()]
    if lines:
      return json.loads(lines[-1])['config']
  path = os.path.join(workdir, CONFIG)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def config_changes(old: dict, new: dict) -> dict[str, list]:
  """{dotted field: [old, new]} of every field whose value differs (missing ones too)."""
  a, b = _flatten(old), _flatten(new)
  return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def field_defaults() -> dict:
  """{dotted field: default} of every `mas_jax.config.Config` field that has a default."""
  from mas_jax import config as config_lib

  out = {}
  for section, cls in typing.get_type_hints(config_lib.Config).items():
    if not dataclasses.is_dataclass(cls):
      continue
    for f in dataclasses.fields(cls):
      if f.default is not dataclasses.MISSING:
        out[f'{section}.{f.name}'] = f.default
      elif f.default_factory is not dataclasses.MISSING:
        out[f'{section}.{f.name}'] = f.default_factory()
  return out


def _json_value(value):
  """A default as it reads back from a config's JSON (tuples are lists there)."""
  return json.loads(json.dumps(value))


def check_identity(
  workdir: str, config_json: str, resume_changed: list[str], step: int | None, write: bool
) -> None:
  """Writes config.json on a first run; on a resume, refuses unaccepted config changes.

  Args:
    workdir: the run's directory.
    config_json: this run's config as JSON.
    resume_changed: fields the user allows to differ (--resume_changed).
    step: the step being resumed from (None: a fresh start in this workdir).
    write: whether this process writes files (process 0).

  Raises:
    RunError: one line listing the fields that differ and are neither safe nor accepted.
  """
  new = json.loads(config_json)
  old = current_config(workdir)
  if old is None:
    if write:
      _write_atomic(os.path.join(workdir, CONFIG), json.dumps(new, indent=2) + '\n')
    return
  changes = config_changes(old, new)
  known = set(_flatten(old)) | set(_flatten(new))
  if unknown := sorted(set(resume_changed) - known):
    raise RunError(f'--resume_changed names unknown config fields {unknown}')
  # Fields newer than the run's config, at their defaults: how the run's version ran.
  defaults, old_fields = field_defaults(), _flatten(old)
  added = {
    k
    for k, (_, value) in changes.items()
    if k not in old_fields and k in defaults and _json_value(defaults[k]) == value
  }
  refused = {
    k: v
    for k, v in changes.items()
    if k not in SAFE_TO_CHANGE and k not in resume_changed and k not in added
  }
  if refused:
    listed = ', '.join(f'{k}: {v[0]!r} -> {v[1]!r}' for k, v in refused.items())
    raise RunError(
      f'the config differs from the run in {workdir} in {listed}; pass '
      f'--resume_changed={",".join(refused)} to accept, or use another --workdir'
    )
  if changes:
    logging.info(
      'Resuming with config changes: %s.',
      ', '.join(f'{k}: {v[0]!r} -> {v[1]!r}' for k, v in changes.items()),
    )
    if write:
      record = {'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'step': step, 'changes': changes}
      with open(os.path.join(workdir, HISTORY), 'a') as f:
        f.write(json.dumps({**record, 'config': new}) + '\n')


def truncate_metrics(workdir: str, step: int) -> None:
  """Keeps the metrics.jsonl lines of steps <= step (the restored one); drops unreadable lines."""
  path = os.path.join(workdir, METRICS)
  if not os.path.exists(path):
    return
  kept, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        keep = json.loads(line)['step'] <= step
      except (ValueError, KeyError, TypeError):
        keep = False
      if keep:
        kept.append(line if line.endswith('\n') else line + '\n')
      else:
        dropped += 1
  if dropped:
    _write_atomic(path, ''.join(kept))
    logging.info(
      'metrics.jsonl: dropped %d lines after step %d (the restored step).', dropped, step
    )


def _write_atomic(path: str, text: str) -> None:
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)
