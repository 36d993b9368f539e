"""Packed grain streams for training and eval, and whole tokenized documents.

The training stream shuffles documents, tokenizes them and packs them concat-then-split into
windows of `data.seq_len + 1` tokens, one stream per global batch row. Its position
(TrainBatches.get_state, JSON naming each row) goes into the model's checkpoint, so a resumed
run, with any number of processes, sees exactly the batches an uninterrupted run would.
Raw text shards read in place (data.dataset='files') are streams instead: streams.FileBatches.
"""
import functools

from absl import flags
from absl import logging
import grain
import jax
import numpy as np

from nopejax import config
from nopejax.data import files, shards, sources, streams, tokenizers

# Training reads one stream per batch row: one thread and a short read-ahead each (with
# book-length documents, such as PG19's, grain's default of 500 prefetched documents would hold
# gigabytes of tokens).
_ROW_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)


def _tokenize(example, tokenizer) -> np.ndarray:
  text = example['text']
  return tokenizers.encode_document(tokenizer, text.decode('utf-8') if isinstance(text, bytes) else text)


def _as_tokens_feature(ids) -> dict:
  return {'tokens': ids}


def window_to_example(window: dict, separate_documents: bool) -> dict:
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


def packed_token_windows(tokens: grain.IterDataset, cfg) -> grain.IterDataset:
  """Documents as {'tokens': ids} -> concat-then-split windows of seq_len + 1 (grain's packing)."""
  return _SlicesAsTuples(grain.experimental.ConcatThenSplitIterDataset(
      tokens, length_struct={'tokens': cfg.data.seq_len + 1}))


def _packed_windows(documents: grain.MapDataset, cfg, read_options) -> grain.IterDataset:
  """Token id documents -> concat-then-split windows of seq_len + 1 -> model examples."""
  windows = packed_token_windows(documents.map(_as_tokens_feature).to_iter_dataset(read_options), cfg)
  return windows.map(functools.partial(window_to_example, separate_documents=cfg.data.separate_documents))


def _stack_rows(rows) -> dict:
  return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def _row_streams(cfg, documents: grain.MapDataset, rows, start: int) -> grain.IterDataset:
  """Batches of the given global rows: row r packs documents start + r, start + r + B, ... (B the
  global batch size), so a batch holds windows of B different documents (one packed stream cut
  into rows would fill a batch with consecutive windows of one long file, and train far worse),
  and which documents a row reads does not depend on how rows are spread over processes."""
  batch_size = cfg.train.batch_size
  row_streams = [_packed_windows(documents[start + row::batch_size], cfg, _ROW_READ_OPTIONS) for row in rows]
  return grain.experimental.ZipIterDataset(row_streams).map(_stack_rows)


class TrainBatches:
  """Endless local batches of the training stream for the global batch rows `rows`.

  Its position (get_state / set_state, JSON) names each global row, so a run saved with one
  process layout or mesh resumes exactly with another: every process restores the rows it feeds.
  A run resumed with another train.batch_size cannot continue each row; the stream restarts at
  the first document some row may not have finished, skipping none and re-reading at most
  sum over rows of (row's saved next_index - the smallest + 2) documents (grain's saved index
  lags the document being read by up to one; the count is logged at resume). With
  data.worker_count > 0 grain's worker state is opaque, so a resume needs the same rows on each
  process.
  """

  def __init__(self, cfg, rows, start: int = 0):
    self.cfg, self.rows, self.batch_size = cfg, list(rows), cfg.train.batch_size
    # Shuffle before repeat: the repeated index reaches the shuffle, which reseeds every epoch.
    self.documents = token_documents(cfg, cfg.data.train_split).shuffle(seed=cfg.data.shuffle_seed).repeat()
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
    if state.get('source') == 'files':
      raise config.ConfigError(
          "The checkpoint's data position was saved reading raw shards in place (data.dataset='files'); resume with"
          ' the data settings it was saved with, or train the new data in a new workdir.')
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


def token_documents(cfg, split: str, max_tokens=None) -> grain.MapDataset:
  """Random access to the int32 token ids (BOS first if any) of `split`'s documents, in file order.

  For raw shards read in place (data.dataset='files'), an evaluation split is read from the start
  of data.eval_files up to `max_tokens` tokens (None: all of it).
  """
  if cfg.data.dataset != 'files':
    tokenizer = tokenizers.make_tokenizer(cfg)
    return grain.MapDataset.source(sources.load_split(cfg, split)).map(functools.partial(_tokenize, tokenizer=tokenizer))
  paths, prepared = files.file_shards(cfg, split)
  if prepared:
    return grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths)).map(shards.decode_record)
  if split == cfg.data.train_split:
    raise config.ConfigError(
        'data.train_files names raw text shards, which are read as streams, not by document; prepare them with'
        ' python -m nopejax.prepare for random access, or evaluate on data.eval_files (data.eval_split).')
  return grain.MapDataset.source(streams.stream_documents(paths, cfg, max_tokens))


def train_iterator(cfg, rows=None):
  """Endless, shuffled, packed batches of `data.train_split` for the global batch `rows` this
  process feeds (default all: sharding.process_rows gives them), numpy dicts (see
  `window_to_example`) with one row per entry of `rows`. Each process reads only the documents
  of its rows: 1/processes of the corpus per epoch, never the same document as another process
  within an epoch. Has get_state()/set_state() for checkpoints. Raw shards read in place give a
  streams.FileBatches (its module doc says how it differs)."""
  rows = range(cfg.train.batch_size) if rows is None else rows
  if cfg.data.dataset == 'files':
    paths, prepared = files.file_shards(cfg, cfg.data.train_split)
    if not prepared:
      return streams.FileBatches(cfg, paths, rows)
  return TrainBatches(cfg, rows)


def eval_iterator(cfg, split: str, num_batches: int, rows=None):
  """`num_batches` packed batches of `split` for the global batch `rows` (default all), without
  shuffling, the same every call. Row r reads documents r, r + B, ... in file order, like
  training's row streams. The documents repeat if the split runs out before num_batches."""
  rows = range(cfg.train.batch_size) if rows is None else rows
  # Raw eval shards are read up to twice the tokens the batches take (rows use documents unevenly).
  budget = 2 * num_batches * cfg.train.batch_size * (cfg.data.seq_len + 1)
  documents = _cached_eval_documents(cfg, split, budget).repeat()
  return iter(grain.experimental.LimitIterDataset(_row_streams(cfg, documents, rows, 0), count=num_batches))


_eval_cache = {}


def _cached_eval_documents(cfg, split: str, budget: int) -> grain.MapDataset:
  """token_documents, kept per process: training evaluates the same raw eval shards every time."""
  if cfg.data.dataset != 'files':
    return token_documents(cfg, split)
  key = (cfg.data.eval_files, cfg.data.train_files, cfg.data.text_key, cfg.data.tokenizer, split, budget)
  if key not in _eval_cache:
    _eval_cache.clear()
    _eval_cache[key] = token_documents(cfg, split, budget)
  return _eval_cache[key]


def documents(cfg, split: str) -> grain.MapDataset:
  """Whole tokenized documents of `split` (int32, BOS first if any) in file order, random access."""
  return token_documents(cfg, split)


def global_batch(local_batch: dict, sharding: jax.sharding.Sharding, batch_size: int) -> dict:
  """Local numpy batch (this process's rows, sharding.process_rows) -> global jax arrays of
  `batch_size` rows."""
  return {key: jax.make_array_from_process_local_data(sharding, value, (batch_size,) + value.shape[1:])
          for key, value in local_batch.items()}
