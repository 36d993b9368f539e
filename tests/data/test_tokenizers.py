"""Tests for nopejax.data.tokenizers: byte and SentencePiece tokenizers, BOS, the vocabulary check."""
import pickle

import numpy as np
import pytest

from corpus_files import make_cfg, write_files
from nopejax import config, data


def test_byte_tokenizer_round_trip():
  tokenizer = data.make_tokenizer(config.get_config())
  text = 'def f(x):\n  return "naïve – ∑"\n'
  ids = tokenizer.encode(text)
  assert ids.dtype == np.int32 and ids.max() < 256
  assert len(ids) == len(text.encode('utf-8'))
  assert tokenizer.decode(ids) == text
  assert tokenizer.vocab_size == 256 and tokenizer.bos_id is None


def test_sentencepiece_tokenizer_trained_here(tmp_path):
  sentencepiece = pytest.importorskip('sentencepiece')
  corpus = tmp_path / 'corpus.txt'
  sentences = [f'the quick brown fox {i} jumps over the lazy dog {i * 7}' for i in range(200)]
  corpus.write_text('\n'.join(sentences))
  sentencepiece.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(tmp_path / 'sp'), vocab_size=60, minloglevel=2)
  cfg = config.get_config()
  cfg.data.tokenizer = str(tmp_path / 'sp.model')
  tokenizer = data.make_tokenizer(cfg)
  ids = tokenizer.encode('the lazy fox 12')
  assert ids.dtype == np.int32 and len(ids) > 0 and ids.max() < 60
  assert tokenizer.decode(ids) == 'the lazy fox 12'
  assert tokenizer.vocab_size == 60 and tokenizer.bos_id == 1
  # grain workers receive the tokenizer pickled.
  assert pickle.loads(pickle.dumps(tokenizer)).encode('the lazy fox 12').tolist() == ids.tolist()

  # Whole documents start with BOS.
  text_dir = write_files(tmp_path / 'docs',
                         {'train/a.txt': 'the quick dog', 'train/b.txt': 'a lazy fox'})
  cfg.data.tfds_dir = str(tmp_path / 'tfds')
  cfg.data.dataset = 'textdir'
  cfg.data.text_dir = text_dir
  docs = data.documents(cfg, 'train')
  assert len(docs) == 2
  assert docs[0][0] == 1 and tokenizer.decode(docs[0][1:]) == 'the quick dog'

  cfg.model.vocab_size = 50
  with pytest.raises(ValueError, match='model.vocab_size'):
    data.make_tokenizer(cfg)


def test_missing_tokenizer_file_names_the_key(tmp_path):
  cfg = config.get_config()
  cfg.data.tokenizer = str(tmp_path / 'missing.model')
  with pytest.raises(ValueError, match='data.tokenizer'):
    data.make_tokenizer(cfg)


def test_a_tokenizer_that_is_not_sentencepiece_is_refused(tmp_path):
  (tmp_path / 'tokenizer.json').write_text('{"model": {"type": "BPE"}}')
  cfg = make_cfg('', tokenizer=str(tmp_path / 'tokenizer.json'))
  with pytest.raises(ValueError, match=r"data.tokenizer=.*tokenizer.json' is not a SentencePiece model .*; set it to a"
                                       r" SentencePiece .model file \(a Hugging Face tokenizer.json is not one\)"):
    data.make_tokenizer(cfg)
