"""Prepared token shards: the format `python -m nopejax.prepare` writes and the 'files' source reads.

A prepared directory holds ArrayRecord files whose records are one document each, its token ids
as little-endian int32 bytes, and `index.json`:

  {"tokenizer": {"kind": "byte" | "sentencepiece", "hash": sha256 hex},
   "split": ...,
   "shards": [{"file": "train-00000-of-00004.array_record", "documents": N, "tokens": M}, ...]}

The tokenizer hash tells a run whether the shards were tokenized as it would tokenize them:
sha256 of b'byte' for the byte tokenizer, of the .model file's bytes for SentencePiece.
Paths may be gs:// URLs.
"""
import hashlib
import json

from etils import epath
import numpy as np

from nopejax import config

INDEX_FILE = 'index.json'


def tokenizer_identity(tokenizer_setting: str) -> dict:
  """{'kind', 'hash'} of a `data.tokenizer` value ('byte' or a SentencePiece .model path)."""
  if tokenizer_setting == 'byte':
    return {'kind': 'byte', 'hash': hashlib.sha256(b'byte').hexdigest()}
  path = epath.Path(tokenizer_setting)
  if not path.is_file():
    raise config.ConfigError(
        f"data.tokenizer={tokenizer_setting!r} is neither 'byte' nor an existing file; set it to"
        " 'byte' or to the path of a SentencePiece .model file.")
  return {'kind': 'sentencepiece', 'hash': hashlib.sha256(path.read_bytes()).hexdigest()}


def tokenizer_hash(cfg) -> str:
  """The sha256 hex that identifies the run's tokenizer (`data.tokenizer`)."""
  return tokenizer_identity(cfg.data.tokenizer)['hash']


def encode_record(ids) -> bytes:
  """A document's token ids -> one ArrayRecord record (little-endian int32)."""
  return np.asarray(ids, '<i4').tobytes()


def decode_record(record: bytes) -> np.ndarray:
  """One ArrayRecord record -> the document's int32 token ids."""
  return np.frombuffer(record, '<i4').astype(np.int32)


def write_index(directory, index: dict) -> None:
  """Writes `index.json` into `directory` (written last by prepare: its presence means complete)."""
  path = epath.Path(directory) / INDEX_FILE
  tmp = path.parent / (INDEX_FILE + '.tmp')
  tmp.write_text(json.dumps(index, indent=1, sort_keys=True) + '\n')
  tmp.rename(path)


def read_index(directory) -> dict:
  """The `index.json` of a prepared directory, checked for the fields a reader needs."""
  path = epath.Path(directory) / INDEX_FILE
  if not path.exists():
    raise config.ConfigError(
        f'{path} does not exist, so {directory} is not a complete prepared shard directory;'
        ' run `python -m nopejax.prepare` to (re)write it, or point the data setting at raw text shards.')
  try:
    index = json.loads(path.read_text())
    for field in ('tokenizer', 'shards'):
      if field not in index:
        raise ValueError(f'no {field!r} field')
    for shard in index['shards']:
      int(shard['documents'])
      str(shard['file'])
    str(index['tokenizer']['hash'])
  except (ValueError, KeyError, TypeError) as e:
    raise config.ConfigError(
        f'{path} is not a valid shard index ({e}); rerun `python -m nopejax.prepare` to rewrite it.') from None
  return index


def check_tokenizer(index: dict, directory, cfg) -> None:
  """Refuses shards tokenized with another tokenizer than the run's `data.tokenizer`."""
  run = tokenizer_identity(cfg.data.tokenizer)
  if index['tokenizer']['hash'] != run['hash']:
    raise config.ConfigError(
        f'{directory} was prepared with another tokenizer ({index["tokenizer"].get("kind")}, sha256'
        f' {index["tokenizer"]["hash"][:12]}) than data.tokenizer={cfg.data.tokenizer!r} ({run["kind"]},'
        f' sha256 {run["hash"][:12]}); set data.tokenizer to the one the shards were prepared with, or'
        ' prepare them again with this one.')
