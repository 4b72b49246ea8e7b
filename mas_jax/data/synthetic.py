"""Random token batches for benchmarks on machines without tensorflow-datasets."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from mas_jax.config import DataConfig


class SyntheticSource:
  """Uniform random tokens; row r of batch i is a pure function of (seed, stream, i, r).

  So the global batch does not depend on how it is split: data shard s of n yields rows
  [s * B / n, (s + 1) * B / n) of the batch a single shard would yield, and its state
  ({'index': batches consumed}) is the same on every shard.
  """

  is_sample = False

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
    self.host_batch = cfg.batch_size // shard_count
    self.row_len = cfg.seq_len + 1
    self.first_row = shard_index * self.host_batch
    self.vocab_size, self.seed = vocab_size, seed

  def _batch(self, stream: int, index: int) -> np.ndarray:
    rows = range(self.first_row, self.first_row + self.host_batch)
    return np.stack(
      [
        np.random.default_rng([self.seed, stream, index, r]).integers(
          0, self.vocab_size, self.row_len, dtype=np.int32
        )
        for r in rows
      ]
    )

  def train_batches(self, state: dict | None = None) -> Iterator[tuple[np.ndarray, dict]]:
    index = int(state['index']) if state else 0
    while True:
      index += 1
      yield self._batch(0, index), {'index': index}

  def eval_batches(self, num_batches: int) -> Iterator[np.ndarray]:
    for i in range(num_batches):
      yield self._batch(1, i)
