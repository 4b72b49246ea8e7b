"""Command-line plumbing shared by train.py and generate.py: quiet logs, one-line flag errors.

- `quiet_libraries(verbosity)`: at the default `--verbosity=0`, INFO lines of other packages
  (orbax, jax, tensorflow-datasets) are dropped and mas-jax's own INFO lines stay; their warnings
  and errors always show, as one line each (no traceback). `--verbosity=1` shows everything.
- `parse_flags_one_line`: absl's flag parser, except that a `--config.<field>` override naming a
  field the config does not have ends in one line naming the nearest valid field, not a
  traceback.
- `progress(total, initial)`: a tqdm bar over steps, only when stdout is a terminal.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging as py_logging
import os
import sys

from absl import flags, logging

_OURS = (os.sep + 'mas_jax' + os.sep, os.sep + 'train.py', os.sep + 'generate.py')


class _OnlyOursBelowWarning(py_logging.Filter):
  """Other packages: warnings and errors only, without their tracebacks (our error says why)."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if any(s in record.pathname for s in _OURS):
      return True
    record.exc_info = record.exc_text = None
    return record.levelno >= py_logging.WARNING


_FILTER = _OnlyOursBelowWarning()


def quiet_libraries(verbosity: int) -> None:
  """Drops other packages' INFO lines unless verbosity >= 1 (see the module docstring)."""
  handler = logging.get_absl_handler()
  handler.removeFilter(_FILTER)
  if verbosity < 1:
    handler.addFilter(_FILTER)


def _config_fields(config_path: str) -> list[str]:
  """Dotted names of every field of the config file's get_config()."""
  spec = importlib.util.spec_from_file_location('_mas_jax_config_file', config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)

  def walk(cd, prefix):
    for key, value in cd.items():
      if hasattr(value, 'items'):
        yield from walk(value, f'{prefix}{key}.')
      else:
        yield f'{prefix}{key}'

  return list(walk(module.get_config(), ''))


def unknown_config_override(argv: list[str]) -> str | None:
  """One line for the first `--config.x=...` naming no field of the config file, else None."""
  config_path = 'configs/tiny.py'
  for arg in argv[1:]:
    if arg.startswith('--config='):
      config_path = arg.split('=', 1)[1].split(':', 1)[0]
  try:
    fields = _config_fields(config_path)
  except Exception:  # noqa: BLE001  (a broken config file is reported by absl itself)
    return None
  for arg in argv[1:]:
    if not arg.startswith('--config.'):
      continue
    name = arg[len('--config.') :].split('=', 1)[0]
    if name not in fields:
      near = difflib.get_close_matches(name, fields, n=1, cutoff=0.5)
      hint = f'; did you mean --config.{near[0]}?' if near else ''
      return f'--config.{name}: {config_path} has no field {name!r}{hint}'
  return None


def parse_flags_one_line(argv: list[str]) -> list[str]:
  """absl flag parsing; unknown flags and config fields exit(1) with one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'FATAL Flags parsing error: {str(e).splitlines()[0]}')
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    line = unknown_config_override(argv) or f'{type(e).__name__}: {str(e).splitlines()[0]}'
    sys.exit(f'FATAL Flags parsing error: {line}')


def progress(total: int, initial: int, enabled: bool):
  """A tqdm bar over training steps (steps/s, ETA, postfix loss), off unless stdout is a tty."""
  from tqdm import tqdm

  return tqdm(
    total=total,
    initial=initial,
    unit='step',
    file=sys.stdout,
    dynamic_ncols=True,
    disable=not (enabled and sys.stdout.isatty()),
    leave=True,
  )
