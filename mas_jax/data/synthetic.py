"""Random token batches for benchmarks on machines without tensorflow-datasets."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from mas_jax.config import DataConfig


class SyntheticSource:
  """Uniform random tokens; batch i is a pure function of (seed, process, i)."""

  is_sample = False

  def __init__(
    self,
    cfg: DataConfig,
    vocab_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
  ):
    if cfg.batch_size % process_count:
      raise ValueError(
        f'data.batch_size={cfg.batch_size} does not divide over {process_count} processes'
      )
    self.shape = (cfg.batch_size // process_count, cfg.seq_len + 1)
    self.vocab_size, self.seed, self.process_index = vocab_size, seed, process_index

  def _batch(self, stream: int, index: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, stream, self.process_index, index])
    return rng.integers(0, self.vocab_size, self.shape, dtype=np.int32)

  def train_batches(self, state: dict | None = None) -> Iterator[tuple[np.ndarray, dict]]:
    index = int(state['index']) if state else 0
    while True:
      index += 1
      yield self._batch(0, index), {'index': index}

  def eval_batches(self, num_batches: int) -> Iterator[np.ndarray]:
    for i in range(num_batches):
      yield self._batch(1, i)
