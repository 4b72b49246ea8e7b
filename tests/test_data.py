"""Packing keeps every token exactly once; the C4 pipeline reads the sample and resumes exactly."""

import itertools

import numpy as np
import pytest
from conftest import tiny_config

from mas_jax import config as config_lib
from mas_jax.data import c4, get_source, sample


def test_pack_keeps_every_token_exactly_once():
  rng = np.random.default_rng(0)
  docs = [
    np.append(rng.integers(3, 100, rng.integers(1, 40)), 2).astype(np.int32) for _ in range(50)
  ]
  batches = [b for b, _ in c4.pack(iter(docs), rows=3, row_len=7)]
  stream = np.concatenate(docs)
  packed = np.concatenate([b.reshape(-1) for b in batches])
  # Rows are consecutive chunks of the EOS-separated stream; only the tail that does not fill a
  # whole batch is left over (and is carried in the state, not lost).
  np.testing.assert_array_equal(packed, stream[: packed.size])
  assert stream.size - packed.size < 3 * 7


def test_pack_resumes_from_state():
  docs = [np.arange(i * 10, i * 10 + 9, dtype=np.int32) for i in range(30)]
  straight = list(c4.pack(iter(docs), rows=2, row_len=5))
  _, state = straight[3]
  resumed = c4.pack(
    iter(docs[state['docs'] :]), rows=2, row_len=5, docs=state['docs'], leftover=state['leftover']
  )
  for (a, _), (b, _) in zip(straight[4:], resumed, strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope='module')
def source(sample_dir):
  cd = tiny_config(**{'data.data_dir': sample_dir, 'data.batch_size': 4, 'data.seq_len': 32})
  return get_source(config_lib.from_config_dict(cd))


def test_c4_sample_batches(source):
  assert source.is_sample
  batch, state = next(source.train_batches())
  assert batch.shape == (4, 33) and batch.dtype == np.int32
  assert batch.max() < 512 and state['docs'] >= 1
  eos = source.tokenizer.eos_id()
  assert (batch == eos).any() or state['docs'] == 1
  eval_a = list(source.eval_batches(2))
  eval_b = list(source.eval_batches(2))
  np.testing.assert_array_equal(eval_a, eval_b)


def test_c4_stream_resumes_exactly(source):
  straight = list(itertools.islice(source.train_batches(), 6))
  resumed = list(itertools.islice(source.train_batches(straight[2][1]), 3))
  for (a, _), (b, _) in zip(straight[3:], resumed, strict=True):
    np.testing.assert_array_equal(a, b)


def test_c4_version_3_0_1_loads_unchanged(tmp_path):
  """The same tfds.load path reads a prepared c4/en:3.0.1 (here the sample written as 3.0.1)."""
  sample.build(str(tmp_path), '3.0.1')
  cd = tiny_config(
    **{
      'data.data_dir': str(tmp_path),
      'data.version': '3.0.1',
      'data.batch_size': 2,
      'data.seq_len': 16,
    }
  )
  source = get_source(config_lib.from_config_dict(cd))
  assert source.name == 'c4/en:3.0.1'
  assert (tmp_path / 'c4' / 'en' / '3.0.1' / 'dataset_info.json').exists()
  batch, _ = next(source.train_batches())
  assert batch.shape == (2, 17)
