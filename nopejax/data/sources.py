"""Corpora as tfds builders, written as array_record and read without tensorflow through
`builder.as_data_source()`:

  pystdlib  every .py file of the running interpreter's standard library (bundled).
  textdir   a directory of .txt files and/or .jsonl files (local copies of PG19, proof-pile, ...).

data.dataset='files' prepares nothing: its shards are read in place (files.file_shards).

Documents go to train/validation/test by the md5 of their name, so adding files never moves
existing documents between splits. A prepared textdir copy records the files it was prepared
from and refuses to serve a directory changed since. Paths (data.text_dir, data.tfds_dir) may
be gs:// URLs.
"""
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import os
import pathlib
import re
import sys
import sysconfig
import tempfile
import types

from etils import epath
import tensorflow_datasets as tfds

from nopejax import config, paths
from nopejax.data import files, prepared

SPLITS = ('train', 'validation', 'test')
DATASETS = ('pystdlib', 'textdir', 'files')
# Percent buckets of md5(name) % 100 for each split.
_SPLIT_BUCKETS = {'train': (0, 90), 'validation': (90, 95), 'test': (95, 100)}
_TEXT_SUFFIXES = ('.txt', '.jsonl')
# tfds example keys (see _example_key): 2**(128 - 88) = 2**40 characters per split at most.
_KEY_SHIFT = 88
_MAX_SPLIT_CHARS = 1 << (128 - _KEY_SHIFT)


def _split_of(name: str) -> str:
  """The split a document belongs to, fixed by the md5 of its name."""
  bucket = int(hashlib.md5(name.encode('utf-8')).hexdigest(), 16) % 100
  for split, (low, high) in _SPLIT_BUCKETS.items():
    if low <= bucket < high:
      return split
  raise AssertionError(bucket)


def _in_split(split: str):
  return lambda name: _split_of(name) == split


def _documents_in_files(root: epath.Path, files, text_key: str, keep, strict=True):
  """Yields (name, text) for every non-empty document whose name passes `keep`. `strict`: refuse
  binary and non-UTF-8 files (a user's corpus); else decode them with replacement characters (the
  bundled standard library, whose four latin-1 / koi8-r test files are Python source all the same).

  Streams: a .jsonl file is read line by line, and a line is only parsed when its document is
  kept, so the three split passes over a big corpus parse each line once.
  """
  for path in files:
    name = path.relative_to(root).as_posix()
    if path.suffix == '.jsonl':
      with path.open('rb') as lines:
        for lineno, line in enumerate(lines, 1):
          doc_name = f'{name}:{lineno}'
          if not line.strip() or not keep(doc_name):
            continue
          record = _json_line(_utf8_text(line, f'{path}:{lineno}'), f'{path}:{lineno}')
          if text_key not in record:
            raise config.ConfigError(
                f'data.text_key={text_key!r} is not a field of {path}:{lineno}; set data.text_key'
                f' to the field that holds the text (this line has {sorted(record)[:8]}).')
          if not isinstance(record[text_key], str):
            raise config.ConfigError(
                f'The {text_key!r} field of {path}:{lineno} is a {type(record[text_key]).__name__}, not a string;'
                ' store the text as a string there, or set data.text_key to the field that holds it.')
          if record[text_key]:
            yield doc_name, record[text_key]
    elif keep(name):
      raw = path.read_bytes()
      text = _utf8_text(raw, str(path)) if strict else raw.decode('utf-8', errors='replace')
      if text:
        yield name, text


def _utf8_text(raw: bytes, where: str) -> str:
  """Decoded text; binary and non-UTF-8 data is refused, never trained as replacement characters."""
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise config.ConfigError(
        f'{where} is not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); convert it to UTF-8 or'
        ' remove it from data.text_dir.') from None
  if '\x00' in text:
    raise config.ConfigError(
        f'{where} holds NUL bytes, so it is binary, not text; remove it from data.text_dir.')
  return text


def _json_line(line: str, where: str) -> dict:
  try:
    record = json.loads(line.rstrip('\r\n'))
  except json.JSONDecodeError as e:
    raise config.ConfigError(f'{where} is not valid JSON ({e.msg}, column {e.colno}); fix or delete that'
                             ' line (.jsonl files hold one JSON object per line).') from None
  if not isinstance(record, dict):
    raise config.ConfigError(f'{where} is a JSON {type(record).__name__}, not an object; .jsonl files hold'
                             ' one JSON object per line, fix that line.')
  return record


def _features():
  return tfds.features.FeaturesDict({'text': tfds.features.Text(), 'name': tfds.features.Text()})


def _stdlib_files(root: epath.Path) -> list[epath.Path]:
  """Every .py file under the standard library, sorted, without third-party site-packages."""
  local_root = pathlib.Path(root)  # Always local: the running interpreter's own files.
  return sorted(epath.Path(path) for path in local_root.rglob('*.py')
                if 'site-packages' not in path.relative_to(local_root).parts and path.is_file())


def _example_key(chars_before: int) -> int:
  """A document's tfds key: the text written before it in its split, in the top bits of 128.

  With disable_shuffling tfds orders a split by key, and a split over 1 GB is spilled into 1000
  temporary buckets by key * 1000 / 2**128, each sorted in memory when written out. Small keys
  (0, 1, 2, ...) would put the whole split in bucket 0; these give each bucket about 1 GB of text.
  """
  if chars_before >= _MAX_SPLIT_CHARS:
    raise config.ConfigError(
        f'data.text_dir holds more than {_MAX_SPLIT_CHARS:,} characters in one split, more than'
        ' one tfds split can hold here; point data.text_dir at a smaller part of the corpus.')
  return chars_before << _KEY_SHIFT


def _keyed_examples(documents):
  chars_before = 0
  for name, text in documents:
    yield _example_key(chars_before), {'text': text, 'name': name}
    chars_before += len(text)  # Documents are never empty, so keys strictly increase.


class _NeverRaised(Exception):
  pass


# What tfds's shuffler needs of tensorflow, done with local files: it writes its temporary buckets
# with tf.io.gfile, so without tensorflow preparing any split over 1 GB would fail.
_LOCAL_FILES_AS_TF = types.SimpleNamespace(
    io=types.SimpleNamespace(
        gfile=types.SimpleNamespace(GFile=open, exists=os.path.exists, remove=os.remove)),
    errors=types.SimpleNamespace(ResourceExhaustedError=_NeverRaised))


def _let_tfds_spill_without_tensorflow():
  if importlib.util.find_spec('tensorflow') is None:
    from tensorflow_datasets.core import shuffle  # pylint: disable=g-import-not-at-top
    shuffle.tf = _LOCAL_FILES_AS_TF


def _nonempty_splits(splits: dict) -> dict:
  """Drops splits without examples, which tfds refuses to write; `load_split` reports them.

  Peeks at each generator's first example: in a big corpus every split shows up within the first
  few hundred documents, so this costs no extra pass.
  """
  nonempty = {}
  for split, examples in splits.items():
    first = next(examples, None)
    if first is not None:
      nonempty[split] = itertools.chain([first], examples)
  return nonempty


class Pystdlib(tfds.core.GeneratorBasedBuilder):
  """The running interpreter's standard library .py files, one document each."""

  name = 'pystdlib'
  VERSION = tfds.core.Version('1.0.0')
  # The files differ between Python versions, so each minor version gets its own prepared copy.
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name=f'py{sys.version_info.major}{sys.version_info.minor}')]

  def _info(self):
    # DatasetInfo directly: `dataset_info_from_configs` would read metadata files from the
    # package directory this module lives in.
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__, features=_features(), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    root = epath.Path(sysconfig.get_paths()['stdlib'])
    files = _stdlib_files(root)
    return _nonempty_splits({
        split: self._generate_examples(_documents_in_files(root, files, '', _in_split(split), strict=False))
        for split in SPLITS
    })

  def _generate_examples(self, documents):
    return _keyed_examples(documents)


@dataclasses.dataclass
class TextdirConfig(tfds.core.BuilderConfig):
  text_key: str = 'text'


class Textdir(tfds.core.GeneratorBasedBuilder):
  """A directory of .txt documents and .jsonl files (one JSON document per line)."""

  name = 'textdir'
  VERSION = tfds.core.Version('1.0.0')
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'Set data.text_dir to a directory of .txt and/or .jsonl files.'

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__, features=_features(), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    root = epath.Path(dl_manager.manual_dir)
    text_key = self.builder_config.text_key
    if _has_split_dirs(root):
      # The user's own split: every file under train/ is a training document, and so on.
      splits = {split: _documents_in_files(root, _text_files(root / split), text_key, lambda name: True)
                for split in SPLITS}
    else:
      files = _text_files(root)
      splits = {split: _documents_in_files(root, files, text_key, _in_split(split)) for split in SPLITS}
    splits = {split: self._generate_examples(documents) for split, documents in splits.items()}
    splits = _nonempty_splits(splits)
    if not splits:
      raise config.ConfigError(
          f'data.text_dir={os.fspath(root)!r} has only empty documents; add text to its .txt/.jsonl'
          ' files or point data.text_dir at the directory that has it.')
    return splits

  def _generate_examples(self, documents):
    return _keyed_examples(documents)


def _has_split_dirs(root: epath.Path) -> bool:
  return any((root / split).is_dir() for split in SPLITS)


def _text_files(directory: epath.Path) -> list[epath.Path]:
  """Every .txt/.jsonl file under `directory`, sorted (iterdir, as epath cannot glob ** on URLs)."""
  if not directory.is_dir():
    return []
  files = []
  for entry in directory.iterdir():
    if entry.is_dir():
      files += _text_files(entry)
    elif entry.suffix in _TEXT_SUFFIXES:
      files.append(entry)
  return sorted(files)


def _textdir_config(text_dir: str, text_key: str) -> TextdirConfig:
  """One prepared copy per (directory, text_key): readable basename plus a hash of both."""
  path = paths.resolve(text_dir)
  basename = re.sub(r'[^a-z0-9]+', '_', path.name.lower()).strip('_') or 'root'
  digest = hashlib.md5(f'{path}\0{text_key}'.encode('utf-8')).hexdigest()[:8]
  return TextdirConfig(name=f'{basename}_{digest}', text_key=text_key)


def _builder(cfg, data_dir=None):
  """The tfds builder for `data.dataset` (in `data_dir`, default data.tfds_dir) and the download
  config that prepares it."""
  data_dir = data_dir or cfg.data.tfds_dir or None
  if cfg.data.dataset == 'pystdlib':
    return Pystdlib(data_dir=data_dir, file_format='array_record'), None
  if cfg.data.dataset == 'textdir':
    text_dir = cfg.data.text_dir
    if not text_dir or not epath.Path(text_dir).is_dir():
      raise config.ConfigError(
          f'data.text_dir={text_dir!r} is not a directory; set data.text_dir to the directory of'
          ' your .txt/.jsonl files.')
    root = paths.resolve(text_dir)
    if not _text_files(root):
      raise config.ConfigError(
          f'data.text_dir={text_dir!r} holds no .txt or .jsonl files; add documents there or point'
          ' data.text_dir at the directory that has them.')
    builder = Textdir(data_dir=data_dir, config=_textdir_config(text_dir, cfg.data.text_key),
                      file_format='array_record')
    # A prepared copy is reused as is: after changing the files, delete builder.data_dir.
    return builder, tfds.download.DownloadConfig(manual_dir=str(root))
  raise config.ConfigError(
      f'data.dataset={cfg.data.dataset!r} is not one of {DATASETS}; pick one of those.')


_SOURCE_FILE = 'nopejax_source.json'  # Beside a prepared textdir copy: the fingerprint of its files.
_checked_sources = set()


def _check_source(cfg, builder) -> None:
  """A prepared textdir copy must come from the files data.text_dir holds now: names, sizes and
  bytes (prepared.fingerprint says what that costs); once per process."""
  if cfg.data.dataset != 'textdir' or builder.data_dir in _checked_sources:
    return
  record = epath.Path(builder.data_dir) / _SOURCE_FILE
  root = paths.resolve(cfg.data.text_dir)
  then = prepared.read_record(record)
  now = prepared.fingerprint(root, _text_files(root), then)
  changed = [] if then is None else prepared.changed_files(then, now)
  if changed:
    raise config.ConfigError(
        f'data.text_dir={cfg.data.text_dir!r} changed since it was prepared into {builder.data_dir} (first'
        f' difference: {changed[0]}); delete {builder.data_dir} to prepare it again, or restore the files.')
  if now != then:  # New, or mtimes moved: record them, so the next start reads none of those files.
    try:
      prepared.write_record(record, now)
    except OSError:  # A read-only copy: those files are read again at each start.
      if then is None:
        raise
  _checked_sources.add(builder.data_dir)


def _prepared_builder(cfg):
  builder, _ = _builder(cfg)
  _let_tfds_spill_without_tensorflow()
  if not builder.is_prepared():
    # One process prepares; any other started at once waits, then finds the copy prepared.
    with prepared.one_at_a_time(builder.data_dir):
      builder = _prepare(cfg)
      _check_source(cfg, builder)  # Its files' fingerprint is written before the lock goes.
  _check_source(cfg, builder)
  return builder


def _prepare(cfg):
  builder, download_config = _builder(cfg)  # Afresh: another process may have prepared it meanwhile.
  if paths.is_url(builder.data_dir) and not builder.is_prepared():
    # array_record writes only local files: prepare on local disk, then copy the result up.
    with tempfile.TemporaryDirectory(prefix='nopejax-tfds-') as staging:
      local, _ = _builder(cfg, data_dir=staging)
      local.download_and_prepare(download_config=download_config)
      paths.copy_tree(local.data_dir, builder.data_dir)
    builder = _builder(cfg)[0]
  else:
    builder.download_and_prepare(download_config=download_config)  # Returns at once when prepared.
  return builder


def prepare(cfg) -> str:
  """Prepares the corpus `cfg.data` names if not prepared yet; returns its directory ('' for
  shards read in place, whose globs are checked instead).

  With several processes sharing `data.tfds_dir`, call this on one process first.
  """
  if cfg.data.dataset == 'files':
    files.file_shards(cfg, cfg.data.train_split)
    if cfg.train.eval_every:  # Found now, not at the first evaluation hours later.
      files.file_shards(cfg, cfg.data.eval_split)
    return ''
  return os.fspath(_prepared_builder(cfg).data_dir)


def load_split(cfg, split: str):
  """The random-access tfds data source of one split, preparing the corpus first if needed.

  Each element is a dict with bytes `text` and `name` (path relative to the corpus root, plus
  `:lineno` for a .jsonl line).
  """
  if split not in SPLITS:
    raise config.ConfigError(
        f'Split {split!r} (data.train_split / data.eval_split) is not one of {SPLITS}; pick one.')
  if cfg.data.dataset == 'files':
    raise config.ConfigError("data.dataset='files' has no tfds split to load; read it with pipeline.token_documents.")
  builder = _prepared_builder(cfg)
  # tfds cannot write an empty split, so _nonempty_splits left it out.
  if split not in builder.info.splits or builder.info.splits[split].num_examples == 0:
    raise config.ConfigError(
        f'data.text_dir={cfg.data.text_dir!r} has no documents in the {split!r} split; add'
        f' documents (or a {split}/ subdirectory) there, or evaluate on another split.')
  prepared.check_shards(builder, split)
  return builder.as_data_source(split=split)
