"""Input pipeline: tokenizers, the two tfds corpora, and packed grain streams for training and eval.

Corpora are tfds builders written as array_record and read without tensorflow through
`builder.as_data_source()`:

  pystdlib  every .py file of the running interpreter's standard library (bundled, ~31 MB).
  textdir   a directory of .txt files and/or .jsonl files (local copies of PG19, proof-pile, ...).

Documents go to train/validation/test by the md5 of their name, so adding files never moves
existing documents between splits. The training stream shuffles documents, tokenizes them and
packs them concat-then-split into windows of `data.seq_len + 1` tokens. Its iterator state goes
into the model's orbax CheckpointManager as the item 'data' (grain registers these args with
orbax on import, so the manager needs no item_handlers):

  manager.save(step, args=ocp.args.Composite(
      ..., data=grain.checkpoint.CheckpointSave(iterator)))
  manager.restore(step, args=ocp.args.Composite(
      ..., data=grain.checkpoint.CheckpointRestore(iterator)))  # Sets the state in place.
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
import types

from absl import flags
import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from nopejax import config

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
  """A SentencePiece `.model` file; pickles as its path so grain workers can rebuild it."""

  def __init__(self, model_path: str):
    import sentencepiece  # Imported here: byte-level runs never need it.
    self.model_path = model_path
    self._processor = sentencepiece.SentencePieceProcessor(model_file=model_path)
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
    if not os.path.isfile(cfg.data.tokenizer):
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


def _documents_in_files(root: pathlib.Path, paths, text_key: str, keep):
  """Yields (name, text) for every non-empty document whose name passes `keep`.

  Streams: a .jsonl file is read line by line, and a line is only parsed when its document is
  kept, so the three split passes over a big corpus parse each line once.
  """
  for path in paths:
    name = path.relative_to(root).as_posix()
    if path.suffix == '.jsonl':
      with open(path, encoding='utf-8', errors='replace') as lines:
        for lineno, line in enumerate(lines, 1):
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
      text = path.read_text(encoding='utf-8', errors='replace')
      if text:
        yield name, text


def _features():
  return tfds.features.FeaturesDict({'text': tfds.features.Text(), 'name': tfds.features.Text()})


def _stdlib_files(root: pathlib.Path) -> list[pathlib.Path]:
  """Every .py file under the standard library, sorted, without third-party site-packages."""
  return sorted(path for path in root.rglob('*.py')
                if 'site-packages' not in path.relative_to(root).parts and path.is_file())


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
    root = pathlib.Path(sysconfig.get_paths()['stdlib'])
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
    root = pathlib.Path(dl_manager.manual_dir)
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


def _has_split_dirs(root: pathlib.Path) -> bool:
  return any((root / split).is_dir() for split in SPLITS)


def _text_files(directory: pathlib.Path) -> list[pathlib.Path]:
  if not directory.is_dir():
    return []
  return sorted(path for path in directory.rglob('*')
                if path.suffix in _TEXT_SUFFIXES and path.is_file())


def _textdir_config(text_dir: str, text_key: str) -> TextdirConfig:
  """One prepared copy per (directory, text_key): readable basename plus a hash of both."""
  path = os.path.abspath(text_dir)
  basename = re.sub(r'[^a-z0-9]+', '_', os.path.basename(path).lower()).strip('_') or 'root'
  digest = hashlib.md5(f'{path}\0{text_key}'.encode('utf-8')).hexdigest()[:8]
  return TextdirConfig(name=f'{basename}_{digest}', text_key=text_key)


def _builder(cfg):
  """The tfds builder for `data.dataset` and the download config that prepares it."""
  data_dir = cfg.data.tfds_dir or None
  if cfg.data.dataset == 'pystdlib':
    return Pystdlib(data_dir=data_dir, file_format='array_record'), None
  if cfg.data.dataset == 'textdir':
    text_dir = cfg.data.text_dir
    if not text_dir or not os.path.isdir(text_dir):
      raise config.ConfigError(
          f'data.text_dir={text_dir!r} is not a directory; set data.text_dir to the directory of'
          ' your .txt/.jsonl files.')
    root = pathlib.Path(text_dir)
    if not _text_files(root):
      raise config.ConfigError(
          f'data.text_dir={text_dir!r} holds no .txt or .jsonl files; add documents there or point'
          ' data.text_dir at the directory that has them.')
    builder = Textdir(data_dir=data_dir, config=_textdir_config(text_dir, cfg.data.text_key),
                      file_format='array_record')
    # A prepared copy is reused as is: after changing the files, delete builder.data_dir.
    return builder, tfds.download.DownloadConfig(manual_dir=os.path.abspath(text_dir))
  raise config.ConfigError(
      f'data.dataset={cfg.data.dataset!r} is not one of {DATASETS}; pick one of those.')


def _prepared_builder(cfg):
  builder, download_config = _builder(cfg)
  _let_tfds_spill_without_tensorflow()
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


def _local_batch_size(cfg, process_count: int) -> int:
  if cfg.train.batch_size % process_count:
    raise config.ConfigError(
        f'train.batch_size={cfg.train.batch_size} is not divisible by the {process_count} processes;'
        f' set it to a multiple of {process_count}.')
  return cfg.train.batch_size // process_count


def _process_shard(cfg, split: str, process_index: int, process_count: int) -> grain.MapDataset:
  """This process's documents: every process_count-th one, so processes never share a document."""
  shard = grain.MapDataset.source(load_split(cfg, split))[process_index::process_count]
  if len(shard) == 0:
    raise config.ConfigError(
        f'data.text_dir={cfg.data.text_dir!r}: the {split!r} split has fewer documents than the'
        f' {process_count} processes; add documents there or use fewer processes.')
  return shard


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


def train_iterator(cfg, process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """Endless, shuffled, packed local batches of this process's shard of `data.train_split`.

  Yields dicts of numpy arrays with `train.batch_size // process_count` rows (see
  `_window_to_example`). Each row is its own stream of documents (every rows-th document of the
  shuffled shard), so a batch holds windows of `rows` different documents; one packed stream cut
  into rows would fill a batch with consecutive windows of one long file, and train far worse.
  The iterator has get_state()/set_state() for checkpoints.
  """
  batch_rows = _local_batch_size(cfg, process_count)
  tokenizer = make_tokenizer(cfg)
  documents = _process_shard(cfg, cfg.data.train_split, process_index, process_count)
  # Shuffle before repeat: the repeated index reaches the shuffle, which reseeds every epoch.
  documents = documents.shuffle(seed=cfg.data.shuffle_seed).repeat()
  rows = [_packed_windows(documents[row::batch_rows], cfg, tokenizer, _ROW_READ_OPTIONS) for row in range(batch_rows)]
  batches = grain.experimental.ZipIterDataset(rows).map(_stack_rows)
  if cfg.data.worker_count > 0:
    if not flags.FLAGS.is_parsed():
      # grain reads its absl flags in the workers; outside an absl app use their defaults.
      flags.FLAGS.mark_as_parsed()
    batches = batches.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=cfg.data.worker_count))
  return iter(batches)


def eval_iterator(cfg, split: str, num_batches: int, process_index: int = 0,
                  process_count: int = 1) -> grain.DatasetIterator:
  """`num_batches` packed local batches of `split`, without shuffling, the same every call.

  Row r reads documents r, r + rows, ... in file order, like training's row streams, so a batch
  spans `rows` documents. The documents repeat if the split runs out before num_batches.
  """
  batch_rows = _local_batch_size(cfg, process_count)
  tokenizer = make_tokenizer(cfg)
  documents = _process_shard(cfg, split, process_index, process_count).repeat()
  rows = [_packed_windows(documents[row::batch_rows], cfg, tokenizer, _ROW_READ_OPTIONS) for row in range(batch_rows)]
  batches = grain.experimental.ZipIterDataset(rows).map(_stack_rows)
  return iter(grain.experimental.LimitIterDataset(batches, count=num_batches))


def documents(cfg, split: str) -> grain.MapDataset:
  """Whole tokenized documents of `split` (int32, BOS first if any) in file order, random access."""
  tokenizer = make_tokenizer(cfg)
  source = load_split(cfg, split)
  return grain.MapDataset.source(source).map(functools.partial(_tokenize, tokenizer=tokenizer))


def global_batch(local_batch: dict, sharding: jax.sharding.Sharding) -> dict:
  """Local numpy batch -> global jax arrays, each process contributing its rows."""
  return {key: jax.make_array_from_process_local_data(sharding, value)
          for key, value in local_batch.items()}
