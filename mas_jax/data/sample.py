"""The embedded C4 sample: English text available offline, written in the exact TFDS C4 format.

No download is ever attempted. The text is the docstrings of Python's standard library, read
with `ast` (nothing is imported or executed); every docstring of at least `_MIN_CHARS` characters
becomes one document. TFDS's own writer (`store_as_tfds_dataset`) stores them as
`<data_dir>/c4/en/<version>/c4-{train,validation}.tfrecord-*` with C4's features, so the
unchanged production call `tfds.load('c4/en:3.1.0', data_dir=...)` reads it as it reads real
prepared C4. The sample is built in a temporary directory and renamed into place, so a killed
build leaves nothing half-written.
"""

from __future__ import annotations

import ast
import hashlib
import os
import pathlib
import shutil
import sysconfig
import tempfile

from absl import logging

SAMPLE_MARKER = 'MAS_JAX_EMBEDDED_SAMPLE'
_MIN_CHARS = 200
# One document in this many (by a hash of its key) goes to the validation split.
_VALIDATION_EVERY = 20


def stdlib_documents(max_chars: int = 4_000_000) -> list[tuple[str, str]]:
  """(key, text) of standard-library docstrings in a fixed order, up to max_chars of text."""
  root = pathlib.Path(sysconfig.get_paths()['stdlib'])
  docs, total = [], 0
  for path in sorted(root.rglob('*.py')):
    rel = path.relative_to(root).as_posix()
    if 'site-packages' in rel or '/test' in rel or rel.startswith('test'):
      continue
    try:
      tree = ast.parse(path.read_text(encoding='utf-8'))
    except (SyntaxError, UnicodeDecodeError, ValueError):
      continue
    nodes = [tree] + [
      n
      for n in ast.walk(tree)
      if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    ]
    for node in nodes:
      text = ast.get_docstring(node)
      if text and len(text) >= _MIN_CHARS and text.isascii():
        docs.append((f'{rel}:{getattr(node, "lineno", 0)}', text))
        total += len(text)
        if total >= max_chars:
          return docs
  return docs


def _is_validation(key: str) -> bool:
  return int(hashlib.sha1(key.encode()).hexdigest(), 16) % _VALIDATION_EVERY == 0


def _c4_example(key: str, text: str) -> dict[str, str]:
  return {
    'text': text,
    'url': f'python-stdlib://{key}',
    'content-type': 'text/plain',
    'content-length': str(len(text)),
    'timestamp': '2026-11-01T00:00:00Z',
  }


def build(data_dir: str, version: str) -> int:
  """Writes the sample as c4/en:<version> under data_dir; returns the number of documents."""
  import tensorflow_datasets as tfds
  import tensorflow_datasets.text.c4  # noqa: F401  (registers the c4 builder for its features)

  docs = stdlib_documents()
  splits = {'train': [], 'validation': []}
  for key, text in docs:
    splits['validation' if _is_validation(key) else 'train'].append((key, _c4_example(key, text)))
  features = tfds.builder('c4/en').info.features
  final = pathlib.Path(data_dir) / 'c4' / 'en' / version
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.c4_sample_', dir=final.parent)
  try:
    tfds.dataset_builders.store_as_tfds_dataset(
      name='c4',
      config='en',
      version=version,
      features=features,
      split_datasets=splits,
      data_dir=tmp,
      file_format='tfrecord',
      description='mas-jax embedded C4-format sample',
    )
    built = pathlib.Path(tmp) / 'c4' / 'en' / version
    (built / SAMPLE_MARKER).write_text(f'{len(docs)} documents of Python stdlib docstrings\n')
    try:
      os.rename(built, final)  # atomic; fails if another process finished first
    except OSError:
      if not final.exists():
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  logging.info(
    'No prepared C4 in %s: built the embedded C4-format sample there (%d train, %d '
    'validation documents of Python stdlib docstrings).',
    data_dir,
    len(splits['train']),
    len(splits['validation']),
  )
  return len(docs)


def is_sample(data_dir: str, version: str) -> bool:
  return (pathlib.Path(data_dir) / 'c4' / 'en' / version / SAMPLE_MARKER).exists()
