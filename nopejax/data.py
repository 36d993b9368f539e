"""Input pipeline: tokenizers, the two tfds corpora, and packed grain streams for training and eval.

Corpora are tfds builders written as array_record and read without tensorflow through
`builder.as_data_source()`:

  pystdlib  every .py file of the running interpreter's standard library (bundled, ~31 MB).
  textdir   a directory of .txt files and/or .jsonl files (local copies of PG19, proof-pile, ...).

Documents go to train/validation/test by the md5 of their name, so adding files never moves
existing documents between splits. The training stream shuffles documents, tokenizes them and
packs them concat-then-split into windows of `data.seq_len + 1` tokens, one stream per global batch
row. Its position (TrainBatches.get_state, JSON naming each row) goes into the model's checkpoint,
so a resumed run, with any number of processes, sees exactly the batches an uninterrupted run would.
Paths (data.text_dir, data.tfds_dir, data.tokenizer) may be gs:// URLs.
"""
import dataclasses
import functools
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

from absl import flags
from absl import logging
from etils import epath
import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from nopejax import config, paths

SPLITS = ('train', 'validation', 'test')
DATASETS = ('pystdlib', 'textdir')
# Percent buckets of md5(name) % 100 for each split.
_SPLIT_BUCKETS = {'train': (0, 90), 'validation': (90, 95), 'test': (95, 100)}
_TEXT_SUFFIXES = ('.txt', '.jsonl')
# tfds example keys (see _example_key): 2**(128 - 88) = 2**40 characters per split at most.
_KEY_SHIFT = 88
_MAX_SPLIT_CHARS = 1 << (128 - _KEY_SHIFT)
# Bounded read-ahead: with book-length documents (PG19) the default 500 prefetched documents
# would hold gigabytes of tokens.
_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=64)
# Training reads one stream per batch row: one thread and a short read-ahead each.
_ROW_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)


# ---------------------------------------------------------------------------------------------
# Tokenizers.


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
    tokenizer = SentencePieceTokenizer(cfg.data.tokenizer)
  if tokenizer.vocab_size > cfg.model.vocab_size:
    raise config.ConfigError(
        f'model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer vocabulary'
        f' ({tokenizer.vocab_size}); set model.vocab_size to at least {tokenizer.vocab_size}.')
  return tokenizer


# ---------------------------------------------------------------------------------------------
# Corpora as tfds builders.


def _split_of(name: str) -> str:
  """The split a document belongs to, fixed by the md5 of its name."""
  bucket = int(hashlib.md5(name.encode('utf-8')).hexdigest(), 16) % 100
  for split, (low, high) in _SPLIT_BUCKETS.items():
    if low <= bucket < high:
      return split
  raise AssertionError(bucket)


def _in_split(split: str):
  return lambda name: _split_of(name) == split


def _documents_in_files(root: epath.Path, files, text_key: str, keep):
  """Yields (name, text) for every non-empty document whose name passes `keep`.

  Streams: a .jsonl file is read line by line, and a line is only parsed when its document is
  kept, so the three split passes over a big corpus parse each line once.
  """
  for path in files:
    name = path.relative_to(root).as_posix()
    if path.suffix == '.jsonl':
      with path.open('rb') as lines:
        for lineno, line in enumerate(lines, 1):
          line = line.decode('utf-8', errors='replace')
          doc_name = f'{name}:{lineno}'
          if not line.strip() or not keep(doc_name):
            continue
          record = json.loads(line)
          if text_key not in record:
            raise config.ConfigError(
                f'data.text_key={text_key!r} is not a field of {path}:{lineno}; set data.text_key'
                f' to the field that holds the text (this line has {sorted(record)[:8]}).')
          if record[text_key]:
            yield doc_name, str(record[text_key])
    elif keep(name):
      text = path.read_bytes().decode('utf-8', errors='replace')
      if text:
        yield name, text


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
        split: self._generate_examples(_documents_in_files(root, files, '', _in_split(split)))
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


def _prepared_builder(cfg):
  builder, download_config = _builder(cfg)
  _let_tfds_spill_without_tensorflow()
  if paths.is_url(builder.data_dir) and not builder.is_prepared():
    # array_record writes only local files: prepare on local disk, then copy the result up.
    with tempfile.TemporaryDirectory(prefix='nopejax-tfds-') as staging:
      local, _ = _builder(cfg, data_dir=staging)
      local.download_and_prepare(download_config=download_config)
      paths.copy_tree(local.data_dir, builder.data_dir)
    return _builder(cfg)[0]
  builder.download_and_prepare(download_config=download_config)  # Returns at once when prepared.
  return builder


def prepare(cfg) -> str:
  """Prepares the corpus `cfg.data` names if not prepared yet; returns its directory.

  With several processes sharing `data.tfds_dir`, call this on one process first.
  """
  return os.fspath(_prepared_builder(cfg).data_dir)


def load_split(cfg, split: str):
  """The random-access tfds data source of one split, preparing the corpus first if needed.

  Each element is a dict with bytes `text` and `name` (path relative to the corpus root, plus
  `:lineno` for a .jsonl line).
  """
  if split not in SPLITS:
    raise config.ConfigError(
        f'Split {split!r} (data.train_split / data.eval_split) is not one of {SPLITS}; pick one.')
  builder = _prepared_builder(cfg)
  # tfds cannot write an empty split, so _nonempty_splits left it out.
  if split not in builder.info.splits or builder.info.splits[split].num_examples == 0:
    raise config.ConfigError(
        f'data.text_dir={cfg.data.text_dir!r} has no documents in the {split!r} split; add'
        f' documents (or a {split}/ subdirectory) there, or evaluate on another split.')
  return builder.as_data_source(split=split)


# ---------------------------------------------------------------------------------------------
# Grain streams.


def encode_document(tokenizer, text: str) -> np.ndarray:
  """A document's int32 token ids, BOS first when the tokenizer has one."""
  ids = tokenizer.encode(text)
  if tokenizer.bos_id is not None:
    ids = np.concatenate([np.asarray([tokenizer.bos_id], np.int32), ids])
  return np.asarray(ids, np.int32)


def _tokenize(example, tokenizer) -> np.ndarray:
  text = example['text']
  return encode_document(tokenizer, text.decode('utf-8') if isinstance(text, bytes) else text)


def _as_tokens_feature(example, tokenizer) -> dict:
  return {'tokens': _tokenize(example, tokenizer)}


def _window_to_example(window: dict, separate_documents: bool) -> dict:
  """One packed window of seq_len + 1 tokens -> the model's inputs, targets and masks.

  Segment id 0 marks padding (only the last eval window has any). A document continued from the
  previous window restarts its positions at 0 here: it cannot see its beginning anyway.
  """
  tokens = window['tokens']
  segment_ids = window['tokens_segment_ids']
  is_target = segment_ids[1:] != 0
  if separate_documents:
    # Predicting the next document's first token from the previous document is meaningless.
    loss_mask = is_target & (segment_ids[1:] == segment_ids[:-1])
    input_segment_ids = segment_ids[:-1]
    positions = window['tokens_positions'][:-1]
  else:
    loss_mask = is_target
    input_segment_ids = (segment_ids[:-1] != 0).astype(np.int32)
    positions = np.arange(len(tokens) - 1, dtype=np.int32)
  return {
      'inputs': tokens[:-1].astype(np.int32),
      'targets': tokens[1:].astype(np.int32),
      'segment_ids': input_segment_ids.astype(np.int32),
      'positions': positions.astype(np.int32),
      'loss_mask': loss_mask.astype(np.float32),
  }


class _SlicesAsTuplesIterator(grain.DatasetIterator):
  """Passes a ConcatThenSplit iterator through, repairing its state after a JSON round trip.

  grain 0.2.18 marks "no remainder" with the tuple (-1, -1) and compares with !=, so the list
  [-1, -1] that JSON gives back reads as a remainder and the restored stream silently differs
  (a fresh iterator's checkpoint, for one).
  """

  def __next__(self):
    return next(self._parent)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    slices = {key: tuple(value) for key, value in state['remainder_slices'].items()}
    self._parent.set_state(dict(state, remainder_slices=slices))


class _SlicesAsTuples(grain.IterDataset):

  def __iter__(self):
    return _SlicesAsTuplesIterator(iter(self._parent))


def _packed_windows(documents: grain.MapDataset, cfg, tokenizer, read_options) -> grain.IterDataset:
  """Tokenized documents -> concat-then-split windows of seq_len + 1 -> model examples."""
  tokens = documents.map(functools.partial(_as_tokens_feature, tokenizer=tokenizer))
  windows = _SlicesAsTuples(grain.experimental.ConcatThenSplitIterDataset(
      tokens.to_iter_dataset(read_options), length_struct={'tokens': cfg.data.seq_len + 1}))
  return windows.map(functools.partial(_window_to_example, separate_documents=cfg.data.separate_documents))


def _stack_rows(rows) -> dict:
  return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def _row_streams(cfg, documents: grain.MapDataset, rows, start: int) -> grain.IterDataset:
  """Batches of the given global rows: row r packs documents start + r, start + r + B, ... (B the
  global batch size), so a batch holds windows of B different documents (one packed stream cut
  into rows would fill a batch with consecutive windows of one long file, and train far worse),
  and which documents a row reads does not depend on how rows are spread over processes."""
  tokenizer = make_tokenizer(cfg)
  batch_size = cfg.train.batch_size
  streams = [_packed_windows(documents[start + row::batch_size], cfg, tokenizer, _ROW_READ_OPTIONS) for row in rows]
  return grain.experimental.ZipIterDataset(streams).map(_stack_rows)


class TrainBatches:
  """Endless local batches of the training stream for the global batch rows `rows`.

  Its position (get_state / set_state, JSON) names each global row, so a run saved with one
  process layout or mesh resumes exactly with another: every process restores the rows it feeds.
  A run resumed with another train.batch_size cannot continue each row; the stream restarts at
  the first document some row may not have finished, skipping none and re-reading at most
  sum over rows of (row's saved next_index - the smallest + 2) documents (grain's saved index
  lags the document being read by up to one; the count is logged at resume). With data.worker_count > 0 grain's worker state is opaque, so a resume
  needs the same rows on each process.
  """

  def __init__(self, cfg, rows, start: int = 0):
    self.cfg, self.rows, self.batch_size = cfg, list(rows), cfg.train.batch_size
    # Shuffle before repeat: the repeated index reaches the shuffle, which reseeds every epoch.
    self.documents = grain.MapDataset.source(load_split(cfg, cfg.data.train_split)).shuffle(
        seed=cfg.data.shuffle_seed).repeat()
    self._start_at(start)

  def _start_at(self, start: int) -> None:
    self.start = start
    batches = _row_streams(self.cfg, self.documents, self.rows, start)
    if self.cfg.data.worker_count > 0:
      if not flags.FLAGS.is_parsed():
        # grain reads its absl flags in the workers; outside an absl app use their defaults.
        flags.FLAGS.mark_as_parsed()
      batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.cfg.data.worker_count))
    self.iterator = iter(batches)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self.iterator)

  def _workers_key(self) -> str:
    return 'workers:' + ','.join(map(str, self.rows))

  def get_state(self) -> dict:
    """{'batch_size', 'start', 'streams': {row: state}}; merged over processes it is the whole position."""
    state = self.iterator.get_state()
    if self.cfg.data.worker_count > 0:
      streams = {self._workers_key(): state}
    else:
      streams = {str(row): row_state for row, row_state in zip(self.rows, state['parents'])}
    return {'batch_size': self.batch_size, 'start': self.start, 'streams': streams}

  def set_state(self, state: dict) -> None:
    if state['batch_size'] != self.batch_size:
      return self._restart_for_new_batch_size(state)
    if state['start'] != self.start:
      self._start_at(state['start'])
    streams = state['streams']
    if self.cfg.data.worker_count > 0:
      if self._workers_key() not in streams:
        raise config.ConfigError(
            'The saved data position was written with data.worker_count > 0 by another process layout; '
            'resume with the same processes and mesh as before, or set data.worker_count=0 for a new run.')
      self.iterator.set_state(streams[self._workers_key()])
    else:
      missing = [row for row in self.rows if str(row) not in streams]
      if missing:
        raise config.ConfigError(
            f'The saved data position has no state for batch row {missing[0]} (it was saved with '
            'data.worker_count > 0); resume with the same processes and mesh as before.')
      self.iterator.set_state({'parents': [streams[str(row)] for row in self.rows]})

  def _restart_for_new_batch_size(self, state: dict) -> None:
    old = state['batch_size']
    try:
      current = [state['streams'][str(row)]['parent_state']['next_index'] for row in range(old)]
    except KeyError:
      raise config.ConfigError(
          f'The checkpoint was trained with train.batch_size={old} and data.worker_count > 0, so its data '
          f'position cannot move to batch size {self.batch_size}; set --config.train.batch_size={old}.') from None
    first = min(current)
    # Row r's i-th document is document start + r + i * old; every row has finished those before `first`.
    self._start_at(state['start'] + first * old)
    repeated = sum(c - first + 2 for c in current)
    logging.warning('train.batch_size changed from %d to %d: the data stream restarts at document %d, '
                    're-reading at most %d documents already (partly) seen and skipping none.',
                    old, self.batch_size, self.start, repeated)


def train_iterator(cfg, rows=None) -> TrainBatches:
  """Endless, shuffled, packed batches of `data.train_split` for the global batch `rows` this
  process feeds (default all: sharding.process_rows gives them), numpy dicts (see
  `_window_to_example`) with one row per entry of `rows`. Each process reads only the documents
  of its rows: 1/processes of the corpus per epoch, never the same document as another process
  within an epoch. Has get_state()/set_state() for checkpoints."""
  return TrainBatches(cfg, range(cfg.train.batch_size) if rows is None else rows)


def eval_iterator(cfg, split: str, num_batches: int, rows=None):
  """`num_batches` packed batches of `split` for the global batch `rows` (default all), without
  shuffling, the same every call. Row r reads documents r, r + B, ... in file order, like
  training's row streams. The documents repeat if the split runs out before num_batches."""
  rows = range(cfg.train.batch_size) if rows is None else rows
  documents = grain.MapDataset.source(load_split(cfg, split)).repeat()
  return iter(grain.experimental.LimitIterDataset(_row_streams(cfg, documents, rows, 0), count=num_batches))


def documents(cfg, split: str) -> grain.MapDataset:
  """Whole tokenized documents of `split` (int32, BOS first if any) in file order, random access."""
  tokenizer = make_tokenizer(cfg)
  source = load_split(cfg, split)
  return grain.MapDataset.source(source).map(functools.partial(_tokenize, tokenizer=tokenizer))


def global_batch(local_batch: dict, sharding: jax.sharding.Sharding, batch_size: int) -> dict:
  """Local numpy batch (this process's rows, sharding.process_rows) -> global jax arrays of
  `batch_size` rows."""
  return {key: jax.make_array_from_process_local_data(sharding, value, (batch_size,) + value.shape[1:])
          for key, value in local_batch.items()}
