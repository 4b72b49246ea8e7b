"""SentencePiece tokenizer: load a model, or train one on the embedded sample's train split."""

from __future__ import annotations

import os
import pathlib
import tempfile

import sentencepiece as spm
from absl import logging


def load(path: str, vocab_size: int) -> spm.SentencePieceProcessor:
  """Loads a SentencePiece model; its vocabulary must fit the model's embedding."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'data.tokenizer_path={path!r} does not exist')
  sp = spm.SentencePieceProcessor(model_file=path)
  if sp.get_piece_size() > vocab_size:
    raise ValueError(
      f'tokenizer {path} has {sp.get_piece_size()} pieces, more than model.vocab_size={vocab_size}'
    )
  if sp.eos_id() < 0:
    raise ValueError(f'tokenizer {path} has no EOS piece; documents need one between them')
  return sp


def train(texts, path: str, vocab_size: int) -> None:
  """Trains a BPE SentencePiece model of vocab_size pieces on texts and writes it to path.

  Written under a temporary name and renamed, so a killed run leaves no half-written model.
  """
  target = pathlib.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    prefix = os.path.join(tmp, 'spm')
    spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts),
      model_prefix=prefix,
      vocab_size=vocab_size,
      model_type='bpe',
      character_coverage=1.0,
      num_threads=2,
      unk_id=0,
      bos_id=1,
      eos_id=2,
      pad_id=-1,
      minloglevel=2,
    )
    os.replace(prefix + '.model', target)
  logging.info('Trained a %d-piece SentencePiece vocabulary on the sample: %s', vocab_size, path)
