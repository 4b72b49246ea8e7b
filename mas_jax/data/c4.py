"""C4 through tensorflow-datasets -> SentencePiece -> EOS-separated stream -> packed batches.

Each data shard (`mas_jax.distributed.data_shard`) reads its own part of the split
(`tfds.split_for_jax_process`), shuffles documents deterministically from the seed, tokenizes
them, appends EOS, and cuts the token stream into consecutive rows of seq_len + 1 tokens: no
token is lost or duplicated, and a row may span documents. A batch comes with the data state
after it ({'docs': documents consumed, 'leftover': tokens not yet in a row}); restoring that state
skips `docs` documents before tokenization and refills the leftover, so a resumed run sees
exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import numpy as np
from absl import logging

from mas_jax.config import ConfigError, DataConfig
from mas_jax.data import sample
from mas_jax.data import tokenizer as tok_lib

DEFAULT_DATA_DIR = os.path.join(os.path.expanduser('~'), '.cache', 'mas_jax', 'tfds')


def _import_tf():
  """Imports TensorFlow hidden from GPUs (tf.data must not take GPU memory from JAX)."""
  import tensorflow as tf

  tf.config.set_visible_devices([], 'GPU')
  return tf


def pack(
  token_docs: Iterable[np.ndarray],
  rows: int,
  row_len: int,
  docs: int = 0,
  leftover: np.ndarray | None = None,
) -> Iterator[tuple[np.ndarray, dict]]:
  """Packs EOS-terminated token documents into [rows, row_len] batches.

  Args:
    token_docs: token id arrays, one per document, each already ending in EOS.
    rows, row_len: batch shape.
    docs, leftover: data state to resume from (documents already consumed, unused tokens).

  Yields:
    (batch int32 [rows, row_len], state after this batch).
  """
  need = rows * row_len
  buf = [np.asarray(leftover if leftover is not None else [], np.int32)]
  size = buf[0].size
  for ids in token_docs:
    buf.append(np.asarray(ids, np.int32))
    size += buf[-1].size
    docs += 1
    if size < need:
      continue
    stream = np.concatenate(buf)
    n_batches = stream.size // need
    for i in range(n_batches):
      rest = stream[(i + 1) * need :]
      yield (
        stream[i * need : (i + 1) * need].reshape(rows, row_len),
        {'docs': docs, 'leftover': rest},
      )
    buf, size = [rest], rest.size


class C4Source:
  """Train and eval batches of (prepared or embedded-sample) C4 for one data shard.

  Shard s of n reads the s-th of n disjoint parts of each split and yields batches of
  host_batch = batch_size / n rows.
  """

  def __init__(
    self,
    cfg: DataConfig,
    vocab_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
  ):
    if cfg.batch_size % shard_count:
      raise ValueError(
        f'data.batch_size={cfg.batch_size} does not divide over {shard_count} data shards'
      )

    self.cfg, self.seed = cfg, seed
    self.host_batch = cfg.batch_size // shard_count
    self.shard_index, self.shard_count = shard_index, shard_count
    self.data_dir = cfg.data_dir or DEFAULT_DATA_DIR
    self.name = f'{cfg.dataset}:{cfg.version}'
    dataset_dir = os.path.join(self.data_dir, *cfg.dataset.split('/'))
    info = os.path.join(dataset_dir, cfg.version, 'dataset_info.json')
    if not os.path.exists(info):
      own_cache = os.path.abspath(self.data_dir) == DEFAULT_DATA_DIR
      if not own_cache or cfg.dataset != 'c4/en':  # the sample is built only in its own cache
        versions = sorted(os.listdir(dataset_dir)) if os.path.isdir(dataset_dir) else []
        raise ConfigError(
          f'data.data_dir={self.data_dir!r} holds no prepared {self.name}: {info} does not '
          f'exist (versions of {cfg.dataset} there: {", ".join(versions) or "none"}); leave '
          f'data.data_dir empty for the embedded sample in {DEFAULT_DATA_DIR}'
        )
      sample.build(self.data_dir, cfg.version)
    self.is_sample = sample.is_sample(self.data_dir, cfg.version)
    if self.is_sample:
      logging.info('Data: the embedded C4-format sample in %s (not real C4).', self.data_dir)
    path = cfg.tokenizer_path
    if not path:
      if not self.is_sample:
        raise ValueError(
          'data.tokenizer_path is empty: real C4 needs a SentencePiece model '
          '(e.g. the T5 C4 vocabulary)'
        )
      path = os.path.join(self.data_dir, f'mas_jax_sample_spm_{vocab_size}.model')
      if not os.path.exists(path):
        tok_lib.train(self._texts(cfg.train_split, shuffle=False, repeat=False), path, vocab_size)
    self.tokenizer = tok_lib.load(path, vocab_size)

  def _texts(self, split: str, shuffle: bool, repeat: bool, skip: int = 0) -> Iterator[str]:
    """Document texts of this data shard's part of `split`, after skipping `skip` documents."""
    _import_tf()  # before tfds touches TensorFlow: hide the GPUs from it
    import tensorflow_datasets as tfds

    split = tfds.split_for_jax_process(
      split, process_index=self.shard_index, process_count=self.shard_count
    )
    ds = tfds.load(
      self.name,
      split=split,
      data_dir=self.data_dir,
      download=False,
      shuffle_files=shuffle,
      read_config=tfds.ReadConfig(shuffle_seed=self.seed, interleave_cycle_length=1),
    )
    ds = ds.map(lambda ex: ex['text'], num_parallel_calls=1, deterministic=True)
    if repeat:
      ds = ds.repeat()
    if shuffle:
      ds = ds.shuffle(self.cfg.shuffle_buffer, seed=self.seed, reshuffle_each_iteration=True)
    ds = ds.skip(skip)
    for text in ds.as_numpy_iterator():
      yield text.decode('utf-8')

  def _token_docs(self, texts: Iterable[str]) -> Iterator[np.ndarray]:
    eos = self.tokenizer.eos_id()
    for text in texts:
      yield np.asarray(self.tokenizer.encode(text) + [eos], np.int32)

  def train_batches(self, state: dict | None = None) -> Iterator[tuple[np.ndarray, dict]]:
    """Endless shuffled train batches [host_batch, seq_len + 1] with the state after each."""
    docs = int(state['docs']) if state else 0
    leftover = np.asarray(state['leftover'], np.int32) if state else None
    texts = self._texts(self.cfg.train_split, shuffle=True, repeat=True, skip=docs)
    batches = pack(self._token_docs(texts), self.host_batch, self.cfg.seq_len + 1, docs, leftover)
    return _prefetch(batches, self.cfg.prefetch)

  def eval_batches(self, num_batches: int) -> Iterator[np.ndarray]:
    """The first num_batches batches of the eval split (the same ones at every evaluation)."""
    texts = self._texts(self.cfg.eval_split, shuffle=False, repeat=True)
    batches = pack(self._token_docs(texts), self.host_batch, self.cfg.seq_len + 1)
    for _, (batch, _) in zip(range(num_batches), batches, strict=False):
      yield batch


def _prefetch(batches: Iterator[tuple[np.ndarray, dict]], depth: int):
  """Runs the Python packing ahead of the train step in tf.data's prefetch thread."""
  if depth == 0:
    yield from batches
    return
  tf = _import_tf()

  def gen():
    for batch, state in batches:
      yield batch, state['docs'], state['leftover']

  ds = tf.data.Dataset.from_generator(
    gen,
    output_signature=(
      tf.TensorSpec([None, None], tf.int32),
      tf.TensorSpec([], tf.int64),
      tf.TensorSpec([None], tf.int32),
    ),
  ).prefetch(depth)
  for batch, docs, leftover in ds.as_numpy_iterator():
    yield batch, {'docs': int(docs), 'leftover': leftover}
