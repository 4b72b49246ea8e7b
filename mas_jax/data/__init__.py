"""Input pipelines: `get_source(config, shard_index, shard_count)` for `config.data.source`.

A source reads one data shard (`mas_jax.distributed.data_shard`: the block of rows of the global
batch this process's devices hold) and has `host_batch = batch_size / shard_count`;
`train_batches(state)`, endless (batch [host_batch, seq_len + 1] int32, state after it) pairs
where state is a small JSON-serialisable dict that resumes the stream; and `eval_batches(n)`,
the same n eval batches every time.
"""

from __future__ import annotations

from mas_jax.config import Config


def get_source(config: Config, shard_index: int = 0, shard_count: int = 1):
  """The data source of config.data.source for data shard shard_index of shard_count."""
  kwargs = dict(
    cfg=config.data,
    vocab_size=config.model.vocab_size,
    seed=config.seed,
    shard_index=shard_index,
    shard_count=shard_count,
  )
  if config.data.source == 'synthetic':
    from mas_jax.data.synthetic import SyntheticSource

    return SyntheticSource(**kwargs)
  from mas_jax.data.c4 import C4Source

  return C4Source(**kwargs)
