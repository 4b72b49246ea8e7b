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
  # The first batch and the leftover are exactly the first state['docs'] documents, each
  # ending in EOS.
  eos = source.tokenizer.eos_id()
  stream = np.concatenate([batch.reshape(-1), state['leftover']])
  assert np.sum(stream == eos) == state['docs'] and stream[-1] == eos
  eval_a = list(source.eval_batches(2))
  eval_b = list(source.eval_batches(2))
  np.testing.assert_array_equal(eval_a, eval_b)


def test_every_packed_document_ends_with_eos(source):
  """Token documents are the tokenizer's ids plus EOS; packed rows keep those EOS boundaries."""
  eos = source.tokenizer.eos_id()
  texts = list(itertools.islice(source._texts('validation', shuffle=False, repeat=False), 30))
  texts = [t for t in texts if len(source.tokenizer.encode(t)) < 120]  # 69 to 117 tokens
  ids = [source.tokenizer.encode(text) for text in texts]
  assert all(eos not in doc for doc in ids)
  for doc, expected in zip(source._token_docs(texts), ids, strict=True):
    np.testing.assert_array_equal(doc, expected + [eos])
  # Batches of 4 x 65 tokens span several documents; the rows and the last leftover are the
  # stream of the documents consumed, each closed by EOS.
  packed = list(c4.pack(source._token_docs(texts), rows=4, row_len=65))
  docs = packed[-1][1]['docs']
  assert len(packed) >= 2 and packed[0][1]['docs'] >= 3 and docs >= 6
  stream = np.concatenate([b.reshape(-1) for b, _ in packed] + [packed[-1][1]['leftover']])
  ends = np.flatnonzero(stream == eos)
  np.testing.assert_array_equal(ends + 1, np.cumsum([len(doc) + 1 for doc in ids[:docs]]))
  np.testing.assert_array_equal(stream, np.concatenate([doc + [eos] for doc in ids[:docs]]))


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
