"""Tokenizers: UTF-8 bytes or a SentencePiece model, picked by `data.tokenizer`.

Both pickle cheaply (SentencePiece as its model path), since grain workers receive them pickled.
"""
from etils import epath
import numpy as np

from nopejax import config


class ByteTokenizer:
  """UTF-8 bytes as tokens: vocabulary 256, no BOS."""

  vocab_size = 256
  bos_id = None

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    ids = np.asarray(ids).reshape(-1)
    # A model with a larger vocabulary can sample ids that are not bytes; they are dropped.
    ids = ids[(ids >= 0) & (ids < 256)]
    return ids.astype(np.uint8).tobytes().decode('utf-8', errors='replace')


class SentencePieceTokenizer:
  """A SentencePiece `.model` file (a path or URL); pickles as its path so grain workers can rebuild it."""

  def __init__(self, model_path: str):
    import sentencepiece  # Imported here: byte-level runs never need it.
    self.model_path = model_path
    self._processor = sentencepiece.SentencePieceProcessor(model_proto=epath.Path(model_path).read_bytes())
    self.vocab_size = self._processor.vocab_size()
    bos_id = self._processor.bos_id()
    self.bos_id = bos_id if bos_id >= 0 else None

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._processor.encode(text), dtype=np.int32)

  def decode(self, ids) -> str:
    return self._processor.decode([int(i) for i in np.asarray(ids).reshape(-1)])

  def __getstate__(self):
    return {'model_path': self.model_path}

  def __setstate__(self, state):
    self.__init__(state['model_path'])


def make_tokenizer(cfg):
  """The tokenizer `data.tokenizer` names, checked against `model.vocab_size`."""
  if cfg.data.tokenizer == 'byte':
    tokenizer = ByteTokenizer()
  else:
    if not epath.Path(cfg.data.tokenizer).is_file():
      raise config.ConfigError(
          f"data.tokenizer={cfg.data.tokenizer!r} is neither 'byte' nor an existing file; set it to"
          " 'byte' or to the path of a SentencePiece .model file.")
    try:
      tokenizer = SentencePieceTokenizer(cfg.data.tokenizer)
    except (RuntimeError, OSError) as e:  # sentencepiece's parse error.
      raise config.ConfigError(
          f'data.tokenizer={cfg.data.tokenizer!r} is not a SentencePiece model ({" ".join(str(e).split())[:120]});'
          " set it to a SentencePiece .model file (a Hugging Face tokenizer.json is not one) or to 'byte'.") from None
  if tokenizer.vocab_size > cfg.model.vocab_size:
    raise config.ConfigError(
        f'model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer vocabulary'
        f' ({tokenizer.vocab_size}); set model.vocab_size to at least {tokenizer.vocab_size}.')
  return tokenizer


def encode_document(tokenizer, text: str) -> np.ndarray:
  """A document's int32 token ids, BOS first when the tokenizer has one."""
  ids = tokenizer.encode(text)
  if tokenizer.bos_id is not None:
    ids = np.concatenate([np.asarray([tokenizer.bos_id], np.int32), ids])
  return np.asarray(ids, np.int32)
