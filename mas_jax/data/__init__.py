"""Input pipelines: `get_source(config)` returns the source `config.data.source` names.

A source has `train_batches(state)`, endless (batch [host_batch, seq_len + 1] int32, state after
it) pairs where state is a small JSON-serialisable dict that resumes the stream, and
`eval_batches(n)`, the same n eval batches every time.
"""

from __future__ import annotations

import jax

from mas_jax.config import Config


def get_source(config: Config):
  """The data source of config.data.source for this JAX process."""
  kwargs = dict(
    cfg=config.data,
    vocab_size=config.model.vocab_size,
    seed=config.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  if config.data.source == 'synthetic':
    from mas_jax.data.synthetic import SyntheticSource

    return SyntheticSource(**kwargs)
  from mas_jax.data.c4 import C4Source

  return C4Source(**kwargs)
