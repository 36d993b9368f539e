"""Tests for nopejax.data.pipeline: packing, batch rows over processes, iterator checkpoints, global batches."""
import json

import jax
import numpy as np
import pytest

from corpus_files import make_cfg, write_files
from nopejax import data


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def assert_same_batches(want, got):
  assert len(want) == len(got)
  for want_batch, got_batch in zip(want, got):
    assert want_batch.keys() == got_batch.keys()
    for key in want_batch:
      np.testing.assert_array_equal(want_batch[key], got_batch[key], err_msg=key)


@pytest.fixture
def letters_dir(tmp_path):
  """Documents that start with their only capital letter, so a batch shows where each begins."""
  rng = np.random.default_rng(0)
  files = {}
  for i in range(30):
    length = int(rng.integers(3, 60))
    lowercase = ''.join(rng.choice(list('abcdefgh'), length - 1))
    files[f'train/doc{i:02d}.txt'] = chr(ord('A') + i % 26) + lowercase
  return write_files(tmp_path / 'letters', files)


def expected_segments(inputs_row, targets_row):
  """Segment ids, positions and loss mask that the capital letters imply for one row."""
  starts = np.array([chr(t).isupper() for t in inputs_row])
  starts[0] = True  # Every window starts a segment, also in the middle of a document.
  segment_ids = np.cumsum(starts)
  positions = np.zeros(len(inputs_row), np.int32)
  for t in range(1, len(inputs_row)):
    positions[t] = 0 if starts[t] else positions[t - 1] + 1
  loss_mask = np.array([not chr(t).isupper() for t in targets_row], np.float32)
  return segment_ids, positions, loss_mask


def test_packing_shifts_targets_and_marks_documents(letters_dir, tfds_dir):
  cfg = make_cfg(tfds_dir, dataset='textdir', text_dir=letters_dir, seq_len=16)
  cfg.train.batch_size = 4
  batches = take(data.train_iterator(cfg), 30)  # Over two epochs of the 30 documents.
  for batch in batches:
    assert {key: (value.dtype, value.shape) for key, value in batch.items()} == {
        'inputs': (np.int32, (4, 16)), 'targets': (np.int32, (4, 16)),
        'segment_ids': (np.int32, (4, 16)), 'positions': (np.int32, (4, 16)),
        'loss_mask': (np.float32, (4, 16))}
    np.testing.assert_array_equal(batch['targets'][:, :-1], batch['inputs'][:, 1:])
    for row in range(4):
      segment_ids, positions, loss_mask = expected_segments(batch['inputs'][row], batch['targets'][row])
      np.testing.assert_array_equal(batch['segment_ids'][row], segment_ids)
      np.testing.assert_array_equal(batch['positions'][row], positions)
      np.testing.assert_array_equal(batch['loss_mask'][row], loss_mask)
  assert max(batch['segment_ids'].max() for batch in batches) >= 3

  cfg.data.separate_documents = False
  batch = next(data.train_iterator(cfg))
  np.testing.assert_array_equal(batch['segment_ids'], np.ones((4, 16)))
  np.testing.assert_array_equal(batch['loss_mask'], np.ones((4, 16)))
  np.testing.assert_array_equal(batch['positions'], np.broadcast_to(np.arange(16), (4, 16)))


def document_starts(batches):
  """The capital letters of the token stream the batches were cut from, in order."""
  windows = [np.append(inputs, targets[-1]) for batch in batches
             for inputs, targets in zip(batch['inputs'], batch['targets'])]
  return [chr(t) for t in np.concatenate(windows) if chr(t).isupper()]


def test_train_stream_reshuffles_each_epoch(letters_dir, tfds_dir):
  cfg = make_cfg(tfds_dir, dataset='textdir', text_dir=letters_dir, seq_len=16)
  cfg.train.batch_size = 1  # One row: one stream of documents.
  starts = document_starts(take(data.train_iterator(cfg), 60))
  first_epoch, second_epoch = starts[:30], starts[30:60]
  assert sorted(first_epoch) == sorted(chr(ord('A') + i % 26) for i in range(30))
  assert sorted(first_epoch) != first_epoch  # Shuffled.
  assert first_epoch != second_epoch  # Differently each epoch.
  cfg.data.shuffle_seed = 1
  assert document_starts(take(data.train_iterator(cfg), 5))[:5] != starts[:5]


def test_each_batch_row_reads_its_own_documents(tmp_path, tfds_dir):
  # Document i is made only of the character chr(65 + i), so tokens name their document.
  text_dir = write_files(tmp_path / 'rows', {f'train/{i:02d}.txt': chr(65 + i) * 100 for i in range(16)})
  cfg = make_cfg(tfds_dir, dataset='textdir', text_dir=text_dir, seq_len=16)
  cfg.train.batch_size = 4
  batches = take(data.train_iterator(cfg), 6)
  for batch in batches:
    row_documents = [set(row.tolist()) for row in batch['inputs']]
    # Long documents are not cut into consecutive rows of one batch: every row is another document.
    assert len(set().union(*row_documents)) >= 4
  # Across batches a row continues its own document (a 100-token document spans several windows).
  assert batches[0]['inputs'][0, 0] == batches[1]['inputs'][0, 0]


def test_eval_iterator_is_deterministic_limited_and_spans_documents(letters_dir, tfds_dir):
  cfg = make_cfg(tfds_dir, dataset='textdir', text_dir=letters_dir, seq_len=16)
  cfg.train.batch_size = 4
  everything = list(data.eval_iterator(cfg, 'train', num_batches=40))
  assert len(everything) == 40  # The split is repeated when it runs out.
  assert_same_batches(everything, list(data.eval_iterator(cfg, 'train', num_batches=40)))
  assert_same_batches(everything[:3], list(data.eval_iterator(cfg, 'train', num_batches=3)))
  # No shuffling: row r starts with document r, in file order.
  assert [chr(t) for t in everything[0]['inputs'][:, 0]] == ['A', 'B', 'C', 'D']
  assert all(batch['inputs'].shape == (4, 16) for batch in everything)


@pytest.fixture
def marked_dir(tmp_path):
  """40 training documents; document i is made only of the character chr(65 + i), so tokens name it."""
  return write_files(tmp_path / 'marked', {f'train/{i:02d}.txt': chr(65 + i) * 20 for i in range(40)})


def test_processes_read_their_rows_documents_and_together_make_the_one_process_batch(marked_dir, tfds_dir):
  cfg = make_cfg(tfds_dir, dataset='textdir', text_dir=marked_dir, seq_len=16)
  cfg.train.batch_size = 4
  whole = take(data.train_iterator(cfg), 8)  # 8 x 17 tokens per row: within the first epoch.
  halves = [take(data.train_iterator(cfg, rows), 8) for rows in ([0, 1], [2, 3])]
  assert halves[0][0]['inputs'].shape == (2, 16)
  for step, batch in enumerate(whole):
    for key in batch:
      np.testing.assert_array_equal(np.concatenate([halves[0][step][key], halves[1][step][key]]), batch[key])
  seen = [{int(t) for batch in half for t in batch['inputs'].reshape(-1)} for half in halves]
  assert seen[0] and seen[1] and not seen[0] & seen[1]  # Each reads only its rows' documents.


def test_position_saved_by_one_layout_resumes_in_another(marked_dir, tfds_dir):
  cfg = make_cfg(tfds_dir, dataset='textdir', text_dir=marked_dir, seq_len=16)
  cfg.train.batch_size = 4
  halves = [data.train_iterator(cfg, rows) for rows in ([0, 1], [2, 3])]
  for half in halves:
    take(half, 5)
  states = [half.get_state() for half in halves]
  merged = dict(states[0], streams={**states[0]['streams'], **states[1]['streams']})  # What process 0 saves.
  want = [np.concatenate([a['inputs'], b['inputs']]) for a, b in zip(take(halves[0], 4), take(halves[1], 4))]
  whole = data.train_iterator(cfg)
  whole.set_state(json.loads(json.dumps(merged)))
  np.testing.assert_array_equal(np.stack([batch['inputs'] for batch in take(whole, 4)]), np.stack(want))


def test_new_batch_size_restarts_the_stream_within_the_documented_bound(marked_dir, tfds_dir):
  cfg = make_cfg(tfds_dir, dataset='textdir', text_dir=marked_dir, seq_len=16)
  cfg.train.batch_size = 4
  old = data.train_iterator(cfg)
  consumed = {int(t) for batch in take(old, 3) for t in batch['inputs'].reshape(-1)}
  state = json.loads(json.dumps(old.get_state()))
  current = [state['streams'][str(r)]['parent_state']['next_index'] for r in range(4)]
  cfg.train.batch_size = 2
  new = data.train_iterator(cfg)
  new.set_state(state)
  assert new.start == 4 * min(current)
  batches = take(new, 30)
  # Each new row's token stream; its first (40 - start) / 2 documents of 20 tokens end the first epoch.
  rows = [np.concatenate([np.append(b['inputs'][r], b['targets'][r, -1]) for b in batches]) for r in range(2)]
  rest_of_epoch = set().union(*(set(row[:(40 - new.start) // 2 * 20].tolist()) for row in rows))
  assert len(rest_of_epoch) == 40 - new.start
  assert consumed | rest_of_epoch == set(range(65, 105))  # Nothing skipped.
  # Re-read: at most the documented sum over rows of (next_index - smallest + 2) documents.
  assert len(consumed & rest_of_epoch) <= sum(c - min(current) + 2 for c in current)


# --- Checkpoints --------------------------------------------------------------------------------


@pytest.mark.parametrize('steps_before_save', [0, 7])
def test_iterator_state_round_trips(tfds_dir, steps_before_save):
  cfg = make_cfg(tfds_dir)
  iterator = data.train_iterator(cfg)
  take(iterator, steps_before_save)
  state = iterator.get_state()
  want = take(iterator, 5)
  restored = data.train_iterator(cfg)
  restored.set_state(json.loads(json.dumps(state)))  # Through JSON, as the checkpoint stores it.
  assert_same_batches(want, take(restored, 5))


# --- Whole documents and global arrays ----------------------------------------------------------


def test_documents_are_whole_and_in_file_order(tfds_dir):
  cfg = make_cfg(tfds_dir)
  docs = data.documents(cfg, 'validation')
  source = data.load_split(cfg, 'validation')
  assert len(docs) == len(source)
  for i in (0, len(docs) - 1):
    assert docs[i].dtype == np.int32
    assert data.make_tokenizer(cfg).decode(docs[i]) == source[i]['text'].decode()


def test_global_batch_on_8_device_mesh(tfds_dir):
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  cfg = make_cfg(tfds_dir)
  cfg.train.batch_size = 16
  local = next(data.train_iterator(cfg))
  batch = data.global_batch(local, sharding, 16)
  assert batch.keys() == local.keys()
  for key, array in batch.items():
    assert array.shape == (16, cfg.data.seq_len) and array.dtype == local[key].dtype
    assert array.sharding == sharding
    assert len(array.addressable_shards) == 8
    assert array.addressable_shards[0].data.shape == (2, cfg.data.seq_len)
    np.testing.assert_array_equal(np.asarray(array), local[key])
