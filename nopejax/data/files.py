"""Shard files read in place: finding them from globs, and one grain IterDataset of documents per shard.

Raw text shards (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`, `.parquet` with a text column, `.txt` = one
document) are streams: each shard's iterator keeps its position (decompressed byte offset, or
parquet row group and row) in its state, so a checkpoint holds where every open shard stands.
Prepared shards (`.array_record` beside an `index.json`, from `python -m nopejax.prepare`) are
random access and are read as one grain MapDataset instead (see `prepared_paths`).

Bad input stops the run in one sentence naming the file and the fix, unless data.skip_bad_records
is set: then a bad record (a .jsonl line that is not a JSON object, lacks data.text_key or is not
UTF-8; a parquet row whose text is null) is skipped, and a shard that cannot be read on (a bad
gzip/zstd frame, a truncated file, a parquet file without the column, a shard deleted) is given up
from there, each logged with a running count. Paths may be gs:// URLs.
"""
import dataclasses
import gzip
import hashlib
import itertools
import json
import zlib

from absl import logging
from etils import epath
import grain

from nopejax import config
from nopejax.data import shards as shards_lib
from nopejax.data import tokenizers

RAW_SUFFIXES = ('.jsonl', '.jsonl.gz', '.jsonl.zst', '.parquet', '.txt')
PREPARED_SUFFIX = '.array_record'
_GLOB_CHARS = '*?['
_CHUNK_BYTES = 1 << 20
_skipped = {'records': itertools.count(1), 'shards': itertools.count(1)}  # Counts of this process, thread-safe.


def suffix_of(name: str) -> str | None:
  return next((s for s in RAW_SUFFIXES + (PREPARED_SUFFIX,) if name.endswith(s)), None)


def _require(module: str):
  """pyarrow / zstandard, which only .parquet / .jsonl.zst shards need."""
  try:
    return __import__(module)
  except ImportError:
    raise config.ConfigError(
        f"Reading these shards needs the {module} package, which is not installed; run"
        " pip install 'nopejax[files]'.") from None


# ------------------------------------------------------------------ Finding shards.

def _expand(pattern: str) -> list[epath.Path]:
  """One glob (local or gs://), a file, or a directory (a prepared one, or every shard file under it)."""
  cut = min((pattern.find(c) for c in _GLOB_CHARS if c in pattern), default=-1)
  if cut < 0:
    path = epath.Path(pattern)
    if path.is_dir() and not (path / shards_lib.INDEX_FILE).exists():
      return sorted(p for p in _walk(path) if suffix_of(p.name))
    return [path] if path.exists() else []
  slash = pattern.rfind('/', 0, cut)  # The directory above the first wildcard is listed.
  root = epath.Path(pattern[:slash] or '/') if slash >= 0 else epath.Path('.')
  return sorted(root.glob(pattern[slash + 1:])) if root.is_dir() else []


def _walk(directory: epath.Path):
  for entry in directory.iterdir():
    if entry.is_dir():
      yield from _walk(entry)
    else:
      yield entry


def match(setting: str, key: str) -> list[str]:
  """The shard files and prepared directories a comma-separated list of globs names, sorted.

  Only names without a shard suffix are looked at further (a listing of 10,000 shards on gs://
  costs one request per page, a stat per file would cost 10,000)."""
  patterns = [p.strip() for p in setting.split(',') if p.strip()]
  if not patterns:
    raise config.ConfigError(f"data.dataset='files' needs {key}; set it to a glob of shard files such as"
                             " 'gs://bucket/corpus/*.jsonl.zst' or to a directory prepared by python -m nopejax.prepare.")
  found = []
  for pattern in patterns:
    paths = [p for p in _expand(pattern) if p.name != shards_lib.INDEX_FILE]
    if not paths:
      raise config.ConfigError(
          f'{key}={pattern!r} matches no files; fix the glob (a local or gs:// path with * wildcards) or'
          ' copy the shards there.')
    for path in paths:
      if not suffix_of(path.name) and not (path / shards_lib.INDEX_FILE).exists():
        raise config.ConfigError(
            f'{key} matches {path}, which is none of {RAW_SUFFIXES + (PREPARED_SUFFIX,)} nor a directory prepared'
            ' by python -m nopejax.prepare; narrow the glob to the shards, or convert that file to one of those formats.')
    found += [str(p) for p in paths]
  return sorted(set(found))


def prepared_paths(found: list[str], key: str) -> list[str] | None:
  """The ArrayRecord files of prepared directories (or the matched .array_record files), their
  index.json read and checked; None when `found` are raw text shards."""
  prepared = [name for name in found if not suffix_of(name) or name.endswith(PREPARED_SUFFIX)]
  if not prepared:
    return None
  if len(prepared) != len(found):
    raise config.ConfigError(
        f'{key} mixes prepared shards ({prepared[0]}) with raw text shards; name only one kind there.')
  paths = []
  for name in prepared:
    is_directory = not name.endswith(PREPARED_SUFFIX)
    directory = epath.Path(name) if is_directory else epath.Path(name).parent
    listed = [str(directory / shard['file']) for shard in shards_lib.read_index(directory)['shards']]
    if not is_directory and name not in listed:
      raise config.ConfigError(f'{name} is not listed in {directory / shards_lib.INDEX_FILE}; rerun'
                               ' python -m nopejax.prepare for that directory, or leave the file out of the glob.')
    paths += listed if is_directory else [name]
  return sorted(set(paths))


def file_shards(cfg, split: str) -> tuple[list[str], bool]:
  """(paths, prepared) of the shards read in place for `split`: data.train_files for the training
  split, data.eval_files for any other. Prepared shards must come from the run's tokenizer."""
  key = 'data.train_files' if split == cfg.data.train_split else 'data.eval_files'
  found = match(cfg.data.train_files if key == 'data.train_files' else cfg.data.eval_files, key)
  prepared = prepared_paths(found, key)
  if prepared is None:
    return found, False
  tokenizers.make_tokenizer(cfg)  # The run's tokenizer must exist and fit model.vocab_size.
  for directory in sorted({str(epath.Path(p).parent) for p in prepared}):
    shards_lib.check_tokenizer(shards_lib.read_index(directory), directory, cfg)
  return prepared, True


def fingerprint(paths: list[str]) -> str:
  """Identifies a shard list by its names below their common directory (a moved corpus still matches)."""
  common = paths[0][:paths[0].rfind('/') + 1] if paths else ''
  while common and not all(p.startswith(common) for p in paths):
    common = common[:common.rstrip('/').rfind('/') + 1]
  return hashlib.sha256('\n'.join(p[len(common):] for p in paths).encode()).hexdigest()[:16]


# ------------------------------------------------------------------ Reading one shard.

@dataclasses.dataclass(frozen=True)
class Shard:
  path: str
  text_key: str  # data.text_key: a field / column name, or several separated by commas (the first present).
  skip_bad: bool

  @property
  def keys(self) -> list[str]:
    return [key.strip() for key in self.text_key.split(',') if key.strip()]


class ShardDataset(grain.IterDataset):
  """The non-empty documents (str) of one raw shard, in file order."""

  def __init__(self, shard: Shard):
    super().__init__()
    self.shard = shard

  def __iter__(self):
    if self.shard.path.endswith('.parquet'):
      return _ParquetIterator(self.shard)
    if self.shard.path.endswith('.txt'):
      return _TextFileIterator(self.shard)
    return _JsonlIterator(self.shard)


class _BadShard(Exception):
  """A shard that cannot be read on: (problem, fix)."""


class _ShardIterator(grain.DatasetIterator):
  """Opens its file on first use (opening costs nothing until then: grain asks every iterator for
  its start state) and turns the file's failures into the run's bad-input policy."""

  def __init__(self, shard: Shard):
    super().__init__()
    self.shard, self._reader, self._position, self._done = shard, None, self._start(), False

  def __next__(self) -> str:
    while not self._done:
      try:
        if self._reader is None:
          self._reader = self._open()
        return self._next_document()
      except StopIteration:
        self._done = True
        self.close()
      except _BadShard as e:
        self._bad_shard(*e.args)
      except FileNotFoundError:
        self._bad_shard('was deleted or moved while the run read it', 'put it back (the run resumes exactly from its'
                        ' last checkpoint)')
      except (OSError, EOFError, ValueError, zlib.error) as e:
        if isinstance(e, config.ConfigError):
          raise
        self._bad_shard(f'is corrupt ({" ".join(str(e).split())[:100]})', 'replace it with a good copy')
    raise StopIteration

  def _bad_shard(self, problem: str, fix: str) -> None:
    where = f'{self.shard.path} {problem} ({self._where()})'
    if not self.shard.skip_bad:
      raise config.ConfigError(f'{where}; {fix}, or set data.skip_bad_records=True to skip the rest of such shards.')
    logging.warning('%s; skipping the rest of it (%d shards skipped so far by this process).',
                    where, next(_skipped['shards']))
    self._done = True
    self.close()

  def _bad_record(self, where: str, problem: str, fix: str) -> None:
    if not self.shard.skip_bad:
      raise config.ConfigError(f'{where} {problem}; {fix}, or set data.skip_bad_records=True to skip such records.')
    logging.warning('%s %s; skipped (%d records skipped so far by this process).', where, problem,
                    next(_skipped['records']))

  def get_state(self) -> dict:
    return dict(self._position, done=int(self._done))

  def set_state(self, state: dict) -> None:
    self.close()
    self._reader, self._done = None, bool(state['done'])
    self._position = {key: value for key, value in state.items() if key != 'done'}

  def close(self) -> None:
    if self._reader is not None and hasattr(self._reader, 'close'):
      self._reader.close()
    self._reader = None


class _TextFileIterator(_ShardIterator):
  """A .txt shard is one document."""

  def _start(self):
    return {'read': 0}

  def _where(self):
    return 'while reading it'

  def _open(self):
    return True

  def _next_document(self) -> str:
    if self._position['read']:
      raise StopIteration
    raw = epath.Path(self.shard.path).read_bytes()
    self._position = {'read': 1}
    try:
      text = raw.decode('utf-8')
    except UnicodeDecodeError:
      self._bad_record(self.shard.path, 'is not UTF-8 text', 'convert it to UTF-8')
      raise StopIteration from None
    if not text:
      raise StopIteration
    return text


def _chunks(raw):
  return iter(lambda: raw.read(_CHUNK_BYTES), b'')


def _zstd_chunks(raw):
  """Decompressed chunks of a .zst file of one or more frames; a cut-short last frame is an error
  (zstandard's stream reader would end quietly there)."""
  zstandard = _require('zstandard')
  decompressor = zstandard.ZstdDecompressor()
  frame, in_frame = None, False
  for chunk in _chunks(raw):
    while chunk:
      frame = frame or decompressor.decompressobj()
      try:
        out = frame.decompress(chunk)
      except zstandard.ZstdError as e:
        raise OSError(str(e)) from None
      in_frame = True
      if out:
        yield out
      if frame.eof:
        chunk, frame, in_frame = frame.unused_data, None, False
      else:
        chunk = b''
  if in_frame:
    raise EOFError('the last zstd frame is cut short: the file is truncated')


class _JsonlIterator(_ShardIterator):
  """Lines of a .jsonl file, plain, gzip or zstd; position = decompressed bytes consumed and lines."""

  def _start(self):
    return {'offset': 0, 'line': 0}

  def _where(self):
    return f'after line {self._position["line"]}'

  def _open(self):
    path, offset = self.shard.path, self._position['offset']
    raw = epath.Path(path).open('rb')
    if path.endswith('.zst'):
      chunks = _zstd_chunks(raw)
    elif path.endswith('.gz'):
      chunks = _chunks(gzip.GzipFile(fileobj=raw, mode='rb'))
    else:
      raw.seek(offset)  # Plain files seek; compressed ones decompress up to the offset below.
      chunks, offset = _chunks(raw), 0
    self._file = raw
    return _lines(chunks, offset)

  def close(self):
    if self._reader is not None:
      self._reader.close()
      self._file.close()
    self._reader = None

  def _next_document(self) -> str:
    while True:
      line = next(self._reader)
      self._position = {'offset': self._position['offset'] + len(line), 'line': self._position['line'] + 1}
      if not line.strip():
        continue
      where = f'{self.shard.path}:{self._position["line"]}'
      try:
        record = json.loads(line)
      except UnicodeDecodeError:
        self._bad_record(where, 'is not UTF-8', 'convert the file to UTF-8')
        continue
      except json.JSONDecodeError as e:
        self._bad_record(where, f'is not valid JSON ({e.msg})', 'fix or delete that line')
        continue
      key = next((k for k in self.shard.keys if k in record), None) if isinstance(record, dict) else None
      text = record[key] if key else None
      if not isinstance(text, str):
        has = sorted(record)[:8] if isinstance(record, dict) else type(record).__name__
        self._bad_record(where, f'has no string field data.text_key={self.shard.text_key!r} (it has {has})',
                         'set data.text_key to the field that holds the text, or fix that line')
        continue
      if text:
        return text


def _lines(chunks, skip: int):
  """The lines (bytes, newline kept) of a stream of chunks, after its first `skip` bytes."""
  pending = b''
  for chunk in chunks:
    if skip:
      dropped = min(skip, len(chunk))
      chunk, skip = chunk[dropped:], skip - dropped
    pending += chunk
    lines = pending.split(b'\n')
    pending = lines.pop()
    for line in lines:
      yield line + b'\n'
  if pending:
    yield pending


class _ParquetIterator(_ShardIterator):
  """Rows of a .parquet file through grain's own parquet reader; position = its row group and row."""

  def _start(self):
    return {}

  def _where(self):
    return f'at row {self._position.get("index_within_row_group", 0)} of row group {self._position.get("row_group", 0)}'

  def _open(self):
    _require('pyarrow')
    self._file = epath.Path(self.shard.path).open('rb')
    reader = iter(grain.experimental.ParquetIterDataset([self._file]))
    columns = reader._pq_file.schema_arrow.names  # pylint: disable=protected-access
    self._column = next((key for key in self.shard.keys if key in columns), None)
    if self._column is None:
      self._file.close()
      raise _BadShard(f'has no column data.text_key={self.shard.text_key!r} (it has {columns[:8]})',
                      'set data.text_key to its text column')
    if self._position:
      reader.set_state(self._position)
    return reader

  def close(self):
    if self._reader is not None:
      self._file.close()
    self._reader = None

  def _next_document(self) -> str:
    while True:
      row = next(self._reader)
      self._position = self._reader.get_state()
      text = row[self._column]
      if text is None or not isinstance(text, (str, bytes)):
        row_group, index = self._position['row_group'], self._position['index_within_row_group'] - 1
        self._bad_record(f'{self.shard.path} (row {index} of row group {row_group})', 'has no text in its'
                         f' {self._column!r} column', 'fill in or drop that row')
        continue
      text = text.decode('utf-8', errors='replace') if isinstance(text, bytes) else text
      if text:
        return text
