"""Packed training batches streamed from raw text shards in place (data.dataset='files').

The global batch rows are cut into G equal blocks of R rows, one per process (several processes
holding the same rows read the same block's stream). Block g reads shards g, g + G, g + 2G, ...
of the shard list shuffled from data.shuffle_seed, reshuffled every epoch (grain's MapDataset
shuffle, then repeat), data.open_shards of them at a time, their documents interleaved (one huge
shard holds one slot, and each slot reads ahead in its own thread). Documents are tokenized in
those threads, packed concat-then-split into windows of seq_len + 1, shuffled in windows of
data.shuffle_buffer packed windows, and every R windows are one batch.

The position (FileBatches.get_state, JSON) is each block's grain state, with every open shard's
offset: a run resumed with the same number of blocks (processes) continues exactly, with any
batch size. With another number of blocks the streams restart at the first shard of the
shuffled order some block had not finished, so no shard is skipped; the shards after it that
some block had already read are read again (their count is logged).
"""
import atexit
import functools
import weakref

from absl import logging
import grain
import jax
from jax.experimental import multihost_utils
import numpy as np

from nopejax import config
from nopejax.data import files, tokenizers

# Documents each open shard tokenizes ahead of the interleave, in its own thread.
_SHARD_READ_AHEAD = 16
_open_batches = weakref.WeakSet()


@atexit.register
def _stop_reading_threads():
  """Stops every stream's reading threads before the interpreter ends: a thread killed inside
  grain's or pyarrow's C++ code at exit aborts the process (exit code 134 in place of 0 or 2)."""
  for batches in list(_open_batches):
    batches.close()


def _tokens(text: str, tokenizer) -> dict:
  return {'tokens': tokenizers.encode_document(tokenizer, text)}


def _shard_stream(path: str, cfg, tokenizer) -> grain.IterDataset:
  shard = files.Shard(path, cfg.data.text_key, cfg.data.skip_bad_records)
  return files.ShardDataset(shard).map(functools.partial(_tokens, tokenizer=tokenizer))


def _blocks(rows, batch_size: int) -> tuple[int, int]:
  """(block index g, block count G) of a process's batch rows: the distinct row sets of all
  processes, ordered by their first row (processes holding the same rows are one block)."""
  rows = sorted(rows)
  size = len(rows)
  if jax.process_count() > 1:  # A device mesh may give a process rows that are not consecutive.
    every = multihost_utils.process_allgather(np.asarray(rows, np.int32)).reshape(-1, size)
    blocks = sorted({tuple(process_rows) for process_rows in every.tolist()})
  elif rows == list(range(rows[0], rows[0] + size)) and rows[0] % size == 0:
    # One process, or a test standing for one of several: consecutive blocks of equal size.
    blocks = [tuple(range(start, start + size)) for start in range(0, batch_size, size)]
  else:
    blocks = []
  if not size or batch_size % size or tuple(rows) not in blocks or len(blocks) * size != batch_size:
    raise config.ConfigError(
        f"data.dataset='files' streams to each process its own share of the batch rows, but this one feeds rows"
        f' {rows[:4]}..., not an equal share; use a mesh that splits the batch evenly over processes, or prepare'
        ' the corpus with python -m nopejax.prepare (prepared shards take any layout).')
  return blocks.index(tuple(rows)), len(blocks)


def _find(state, key: str):
  """The first dict nested in a grain state that has `key` (the interleave's, under the packing)."""
  if isinstance(state, dict):
    if key in state:
      return state
    values = state.values()
  elif isinstance(state, list):
    values = state
  else:
    return None
  return next((found for found in map(lambda v: _find(v, key), values) if found is not None), None)


class FileBatches:
  """Endless local batches of the raw shards `paths` for the global batch `rows` (see module doc)."""

  def __init__(self, cfg, paths, rows):
    self.cfg, self.paths, self.rows = cfg, list(paths), list(rows)
    self.batch_size = cfg.train.batch_size
    if cfg.data.worker_count > 0:
      raise config.ConfigError(
          'data.worker_count > 0 reads with grain worker processes, which raw shards read in place do not use (their'
          ' data.open_shards shards are read and tokenized in threads); set data.worker_count=0.')
    self.block, self.blocks = _blocks(self.rows, self.batch_size)
    if len(self.paths) < self.blocks:
      raise config.ConfigError(
          f'data.train_files matches {len(self.paths)} shards but {self.blocks} processes read them, one block of'
          f' shards each; split the corpus into at least {self.blocks} shard files (many more is better).')
    self.tokenizer = tokenizers.make_tokenizer(cfg)
    self.iterator = None
    self._start_at(0)
    _open_batches.add(self)

  def close(self) -> None:
    if self.iterator is not None:
      self.iterator.close()
      self.iterator = None  # Its threads' objects go now, while the modules they need still exist.

  def _start_at(self, start: int) -> None:
    self.close()
    self.start = start
    cfg = self.cfg
    order = grain.MapDataset.source(self.paths).shuffle(seed=cfg.data.shuffle_seed).repeat()
    mine = order[start + self.block::self.blocks].map(
        functools.partial(_shard_stream, cfg=cfg, tokenizer=self.tokenizer))
    documents = grain.experimental.InterleaveIterDataset(
        mine, cycle_length=cfg.data.open_shards, iter_buffer_size=_SHARD_READ_AHEAD)
    from nopejax.data import pipeline  # pylint: disable=g-import-not-at-top (pipeline imports this module)
    windows = pipeline.packed_token_windows(documents, cfg)
    if cfg.data.shuffle_buffer > 1:
      seed = int(np.random.SeedSequence([cfg.data.shuffle_seed, self.block]).generate_state(1)[0])
      windows = grain.experimental.WindowShuffleIterDataset(windows, window_size=cfg.data.shuffle_buffer, seed=seed)
    rows = len(self.rows)
    batches = windows.map(functools.partial(pipeline.window_to_example, separate_documents=cfg.data.separate_documents))
    # Driven from the caller's thread: a read-ahead thread on top of the interleave's own threads can
    # deadlock, when garbage collection in an interleave thread closes an iterator whose read-ahead
    # thread waits on that interleave.
    self.iterator = iter(batches.batch(rows, drop_remainder=True))

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self.iterator)

  def _identity(self) -> dict:
    return {'source': 'files', 'shards': len(self.paths), 'fingerprint': files.fingerprint(self.paths),
            'shuffle_seed': self.cfg.data.shuffle_seed}

  def get_state(self) -> dict:
    """{'batch_size', 'blocks', 'start', identity, 'streams': {block: grain state}}; merged over
    processes (checkpoint.save) it is the whole position."""
    return {'batch_size': self.batch_size, 'blocks': self.blocks, 'start': self.start, **self._identity(),
            'streams': {str(self.block): self.iterator.get_state()}}

  def set_state(self, state: dict) -> None:
    if state.get('source') != 'files':
      raise config.ConfigError(
          "The checkpoint's data position was saved by another data source than data.dataset='files'; resume with"
          ' the data settings it was saved with, or train the new data in a new workdir.')
    identity = self._identity()
    if state['shuffle_seed'] != identity['shuffle_seed']:
      logging.warning('data.shuffle_seed changed from %d to %d: the shard stream starts over in a new order.',
                      state['shuffle_seed'], identity['shuffle_seed'])
      return
    if (state['shards'], state['fingerprint']) != (identity['shards'], identity['fingerprint']):
      raise config.ConfigError(
          f'data.train_files now matches {identity["shards"]} shards, not the {state["shards"]} (or not the same'
          ' names) that the checkpoint\'s data position was saved with; restore those files to resume exactly, or'
          ' set data.shuffle_seed to another value to start a new shuffled pass over the files there now.')
    if state['blocks'] != self.blocks:
      return self._restart_for_new_blocks(state)
    if state['start'] != self.start:
      self._start_at(state['start'])
    self.iterator.set_state(state['streams'][str(self.block)])

  def _restart_for_new_blocks(self, state: dict) -> None:
    """Restarts at the first shard (in the shuffled order) some old block had not finished."""
    old, start = state['blocks'], state['start']
    first_unfinished = []  # Per old block: how many of its shards it had finished, in order.
    for block in range(old):
      interleave = _find(state['streams'][str(block)], 'iterators_in_use_indices')
      open_ones = [i for i, s, done in zip(interleave['iterators_in_use_indices'],
                                           interleave['iterators_in_use_states'], interleave['exhausted'])
                   if s is not None and not done]
      first_unfinished.append(min(open_ones + [interleave['next_index_in_datasets']]))
    # Block b's i-th shard is shard start + b + i * old of the order.
    new_start = min(start + block + old * first for block, first in enumerate(first_unfinished))
    read_again = sum(start + block + old * i >= new_start
                     for block, first in enumerate(first_unfinished) for i in range(first))
    self._start_at(new_start)
    logging.warning('The data position was saved by %d processes (blocks of batch rows), now %d: the shard streams'
                    ' restart at shard %d of the shuffled order; no shard is skipped, %d finished shards (and those'
                    ' open then) are read again.', old, self.blocks, new_start, read_again)


def stream_documents(paths, cfg, max_tokens=None) -> list:
  """Tokenized documents of raw shards `paths` in file order (no shuffle), until `max_tokens`
  tokens (None: all): the evaluation set of data.eval_files, the same on every call."""
  tokenizer = tokenizers.make_tokenizer(cfg)
  documents, total = [], 0
  for path in paths:
    for text in files.ShardDataset(files.Shard(path, cfg.data.text_key, cfg.data.skip_bad_records)):
      documents.append(tokenizers.encode_document(tokenizer, text))
      total += len(documents[-1])
      if max_tokens is not None and total >= max_tokens:
        return documents
  return documents
