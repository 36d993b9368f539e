"""Tests for shards read in place (nopejax.data.files, streams, shards): formats, the split of shards
over processes, epochs, exact resume, bad inputs, and tiny training runs on each kind of shard."""
import gzip
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import small_config
from nopejax import config, data, loop
from nopejax.config import ConfigError
from nopejax.data import files, shards

pa = pytest.importorskip('pyarrow')
pq = pytest.importorskip('pyarrow.parquet')
zstandard = pytest.importorskip('zstandard')

FORMATS = ('.jsonl', '.jsonl.gz', '.jsonl.zst', '.parquet', '.txt')


def jsonl_bytes(texts) -> bytes:
  return b''.join(json.dumps({'text': text, 'id': i}).encode() + b'\n' for i, text in enumerate(texts))


def write_shard(path, texts) -> str:
  """`texts` as one shard in the format its suffix names (.txt: a directory of one-document files)."""
  path = str(path)
  if path.endswith('.jsonl'):
    open(path, 'wb').write(jsonl_bytes(texts))
  elif path.endswith('.jsonl.gz'):
    open(path, 'wb').write(gzip.compress(jsonl_bytes(texts)))
  elif path.endswith('.jsonl.zst'):  # One frame per document: readers must read across frames.
    open(path, 'wb').write(b''.join(zstandard.ZstdCompressor().compress(jsonl_bytes([t])) for t in texts))
  elif path.endswith('.parquet'):
    pq.write_table(pa.table({'text': texts, 'n': list(range(len(texts)))}), path, row_group_size=2)
  return path


def marked_texts(shard, count):
  """Documents that name their shard and number: <shard.doc>, then a few bytes of filler."""
  return [f'<{shard}.{doc}>' + 'x' * (doc % 4) for doc in range(count)]


def write_corpus(directory, suffix='.jsonl', shard_count=8, docs=5) -> str:
  os.makedirs(directory, exist_ok=True)
  for shard in range(shard_count):
    if suffix == '.txt':
      for doc, text in enumerate(marked_texts(shard, docs)):
        open(os.path.join(directory, f'{shard:02d}-{doc}.txt'), 'w').write(text)
    else:
      write_shard(os.path.join(directory, f'{shard:02d}{suffix}'), marked_texts(shard, docs))
  return str(directory)


def files_cfg(train_files, batch_size=4, **data_values):
  cfg = config.get_config()
  cfg.data.dataset = 'files'
  cfg.data.train_files = train_files
  cfg.data.seq_len = 16
  cfg.data.shuffle_buffer = 0
  cfg.data.open_shards = 2
  cfg.train.batch_size = batch_size
  for key, value in data_values.items():
    setattr(cfg.data, key, value)
  return cfg


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def stream_text(batches, row=0) -> str:
  """The text a batch row's windows hold, in order (a window is its inputs plus its last target)."""
  return ''.join(bytes(list(b['inputs'][row]) + [b['targets'][row][-1]]).decode('utf-8', 'replace') for b in batches)


def markers(text):
  return [tuple(map(int, m)) for m in re.findall(r'<(\d+)\.(\d+)>', text)]


def assert_same_batches(want, got):
  assert len(want) == len(got)
  for want_batch, got_batch in zip(want, got):
    for key in want_batch:
      np.testing.assert_array_equal(want_batch[key], got_batch[key], err_msg=key)


# ------------------------------------------------------------------ Formats.

def test_each_format_reads_the_same_documents(tmp_path):
  texts = ['first document', 'second, with "quotes" and ünïcode', 'third\nhas two lines', 'fourth', 'fifth']
  for suffix in FORMATS[:-1]:
    path = write_shard(tmp_path / f'shard{suffix}', texts)
    assert list(files.ShardDataset(files.Shard(path, 'text', False))) == texts, suffix
  for i, text in enumerate(texts):
    (tmp_path / f'doc{i}.txt').write_text(text)
  cfg = files_cfg(str(tmp_path / 'doc*.txt'))
  paths, prepared = files.file_shards(cfg, 'train')
  assert not prepared and [list(files.ShardDataset(files.Shard(p, 'text', False)))[0] for p in paths] == texts


def test_globs_directories_and_comma_lists_find_the_shards(tmp_path):
  write_corpus(tmp_path / 'a', '.jsonl.zst', shard_count=2)
  write_corpus(tmp_path / 'b' / 'deep', '.parquet', shard_count=2)
  found = files.match(f'{tmp_path}/a/*.zst, {tmp_path}/b', 'data.train_files')
  assert [os.path.basename(p) for p in found] == ['00.jsonl.zst', '01.jsonl.zst', '00.parquet', '01.parquet']
  write_corpus(tmp_path / 'c' / 'chunk1', shard_count=1)
  write_corpus(tmp_path / 'c' / 'chunk2', shard_count=2)
  found = files.match(f'{tmp_path}/c/chunk*/*.jsonl', 'data.train_files')
  assert [p[len(str(tmp_path)):] for p in found] == ['/c/chunk1/00.jsonl', '/c/chunk2/00.jsonl', '/c/chunk2/01.jsonl']


# ------------------------------------------------------------------ Processes, epochs, positions.

def block_documents(cfg, block, batches=24):
  """(shard, doc) in the order block `block` (one row of cfg.train.batch_size) reads them."""
  return markers(stream_text(take(data.train_iterator(cfg, [block]), batches)))


def test_each_process_reads_disjoint_interleaved_shards(tmp_path):
  cfg = files_cfg(f'{write_corpus(tmp_path)}/*.jsonl')
  # 8 shards over 4 processes: 2 shards of 5 documents each per epoch.
  first_epoch = [{shard for shard, _ in block_documents(cfg, block)[:10]} for block in range(4)]
  assert set().union(*first_epoch) == set(range(8)) and sum(map(len, first_epoch)) == 8  # Disjoint, all shards.
  documents = block_documents(cfg, 0)
  # Two shards open at a time, their documents alternating.
  assert documents[0][0] != documents[1][0] and [s for s, _ in documents[:4]] == [documents[0][0], documents[1][0]] * 2
  assert [d for s, d in documents if s == documents[0][0]][:5] == list(range(5))  # Each shard in file order.


def test_epochs_reshuffle_the_shards_deterministically_from_the_seed(tmp_path):
  cfg = files_cfg(f'{write_corpus(tmp_path)}/*.jsonl', batch_size=2)

  def shard_sequence(cfg):
    return [shard for shard, _ in block_documents(cfg, 0, batches=60)]

  sequence = shard_sequence(cfg)
  assert shard_sequence(cfg) == sequence  # Same seed, same stream.
  assert sequence[:20] != sequence[20:40]  # Each epoch of block 0 of 2 is 4 shards x 5 documents.
  cfg.data.shuffle_seed = 1
  assert shard_sequence(cfg)[:40] != sequence[:40]


@pytest.mark.parametrize('suffix', FORMATS)
def test_a_position_saved_mid_stream_continues_with_the_same_batches(tmp_path, suffix):
  glob = f'{write_corpus(tmp_path, suffix, shard_count=6, docs=7)}/*{suffix}'
  cfg = files_cfg(glob, open_shards=3, shuffle_buffer=4)
  iterator = data.train_iterator(cfg, [0, 1])
  take(iterator, 7)
  state = json.loads(json.dumps(iterator.get_state()))
  want = take(iterator, 12)  # Past the end of the first epoch.
  resumed = data.train_iterator(cfg, [0, 1])
  resumed.set_state(state)
  assert_same_batches(want, take(resumed, 12))


def test_a_new_batch_size_with_the_same_processes_continues_the_window_stream(tmp_path):
  cfg = files_cfg(f'{write_corpus(tmp_path)}/*.jsonl', batch_size=4)
  iterator = data.train_iterator(cfg, [0, 1])  # Block 0 of 2.
  take(iterator, 3)
  state = json.loads(json.dumps(iterator.get_state()))
  want = take(iterator, 2)
  cfg.train.batch_size = 8
  resumed = data.train_iterator(cfg, [0, 1, 2, 3])  # Still block 0 of 2, four rows now.
  resumed.set_state(state)
  got = next(resumed)
  np.testing.assert_array_equal(got['inputs'], np.concatenate([b['inputs'] for b in want]))


def test_another_process_count_restarts_at_the_first_unfinished_shard(tmp_path, caplog):
  cfg = files_cfg(f'{write_corpus(tmp_path)}/*.jsonl', batch_size=2)
  blocks = [data.train_iterator(cfg, [block]) for block in range(2)]
  take(blocks[0], 3)
  take(blocks[1], 9)
  state = blocks[0].get_state()
  state['streams'].update(blocks[1].get_state()['streams'])  # What checkpoint.save merges.
  one = data.train_iterator(cfg, [0, 1])
  one.set_state(json.loads(json.dumps(state)))
  assert 'restart at shard 0 of the shuffled order' in caplog.text
  # Block 0's first shards were unfinished, so the one process starts at the first shard of the order.
  fresh = data.train_iterator(cfg, [0, 1])
  assert_same_batches(take(fresh, 3), take(one, 3))
  take(blocks[0], 40)  # Both blocks some epochs on: the restart point moves up.
  take(blocks[1], 30)
  state = blocks[0].get_state()
  state['streams'].update(blocks[1].get_state()['streams'])
  caplog.clear()
  one.set_state(json.loads(json.dumps(state)))
  start = int(re.search(r'restart at shard (\d+) of the shuffled order', caplog.text).group(1))
  assert start > 8 and one.start == start
  fresh._start_at(start)
  assert_same_batches(take(fresh, 3), take(one, 3))


def test_eval_batches_read_the_eval_shards_the_same_every_time(tmp_path):
  write_corpus(tmp_path / 'train')
  eval_glob = f'{write_corpus(tmp_path / "eval", ".jsonl.zst", shard_count=2)}/*.zst'
  cfg = files_cfg(f'{tmp_path}/train/*.jsonl', eval_files=eval_glob)
  first = list(data.eval_iterator(cfg, 'validation', 3))
  assert len(first) == 3
  assert_same_batches(first, list(data.eval_iterator(cfg, 'validation', 3)))
  assert markers(stream_text(first))[0] == (0, 0)
  documents = data.documents(cfg, 'test')
  assert len(documents) == 10 and bytes(documents[0].tolist()).decode() == '<0.0>'


# ------------------------------------------------------------------ Bad input.

def read_all(path, skip=False, key='text'):
  return list(files.ShardDataset(files.Shard(str(path), key, skip)))


def test_shards_on_gcs_are_read_in_place_and_resume(gcs, tmp_path):
  from etils import epath
  write_corpus(tmp_path / 'raw', '.jsonl.zst', shard_count=3)
  write_corpus(tmp_path / 'raw', '.parquet', shard_count=3)
  tokenizer = data.ByteTokenizer()
  write_prepared(tmp_path / 'prepared', [tokenizer.encode(t) for t in marked_texts(0, 6)])
  for local in list((tmp_path / 'raw').iterdir()) + list((tmp_path / 'prepared').iterdir()):
    epath.Path(f'gs://bucket/{local.parent.name}/{local.name}').write_bytes(local.read_bytes())
  cfg = files_cfg('gs://bucket/raw/*.zst,gs://bucket/raw/*.parquet', shuffle_buffer=4)
  iterator = data.train_iterator(cfg, [0, 1])
  take(iterator, 4)
  state = json.loads(json.dumps(iterator.get_state()))
  want = take(iterator, 6)
  resumed = data.train_iterator(cfg, [0, 1])
  resumed.set_state(state)
  assert_same_batches(want, take(resumed, 6))
  documents = data.token_documents(files_cfg('gs://bucket/prepared'), 'train')
  assert sorted(bytes(documents[i].tolist()).decode() for i in range(len(documents))) == sorted(marked_texts(0, 6))


def test_a_glob_that_matches_nothing_is_one_sentence(tmp_path):
  with pytest.raises(ConfigError, match=r"data.train_files='.*/nothing/\*.jsonl' matches no files; fix the glob"):
    data.train_iterator(files_cfg(f'{tmp_path}/nothing/*.jsonl'))
  (tmp_path / 'table.csv').write_text('a,b')
  with pytest.raises(ConfigError, match=r'table.csv, which is none of'):
    data.train_iterator(files_cfg(f'{tmp_path}/*'))


def corrupt_shards(tmp_path):
  """(path, documents readable before the damage) for each kind of damaged shard."""
  texts = marked_texts(0, 40)
  whole_gzip = gzip.compress(jsonl_bytes(texts))
  frames = [zstandard.ZstdCompressor().compress(jsonl_bytes(texts[i:i + 10])) for i in range(0, 40, 10)]
  write_shard(tmp_path / 'whole.parquet', texts)
  parquet = (tmp_path / 'whole.parquet').read_bytes()
  damaged = {
      'cut.jsonl.gz': (whole_gzip[:len(whole_gzip) // 2], None),
      'badframe.jsonl.zst': (frames[0] + b'not a zstd frame' + frames[1], 10),
      'cut.jsonl.zst': (b''.join(frames)[:-5], None),
      'cut.parquet': (parquet[:len(parquet) // 2], 0),
  }
  for name, (content, _) in damaged.items():
    (tmp_path / name).write_bytes(content)
  return {tmp_path / name: readable for name, (_, readable) in damaged.items()}


def test_a_corrupt_shard_stops_in_one_sentence_or_is_skipped_with_a_count(tmp_path, caplog):
  for path, readable in corrupt_shards(tmp_path).items():
    with pytest.raises(ConfigError, match=rf'{re.escape(str(path))} is corrupt .*; replace it with a good copy, or set'
                                          r' data.skip_bad_records=True'):
      read_all(path)
    documents = read_all(path, skip=True)
    assert documents == marked_texts(0, 40)[:len(documents)] and (readable is None or len(documents) == readable)
  assert re.search(r'cut.parquet is corrupt .*skipping the rest of it \(\d+ shards skipped so far', caplog.text)


def test_a_line_without_the_text_key_stops_or_is_skipped_with_a_count(tmp_path, caplog):
  path = tmp_path / 'mixed.jsonl'
  path.write_bytes(b'{"text": "one"}\n{"body": "two"}\n{not json\n{"text": "four"}\n')
  with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}:2 has no string field data.text_key='text' \(it has"
                                        r" \['body'\]\); set data.text_key to the field that holds the text"):
    read_all(path)
  assert read_all(path, skip=True) == ['one', 'four']
  assert re.search(r'mixed.jsonl:3 is not valid JSON .*; skipped \(\d+ records skipped so far', caplog.text)
  assert read_all(path, key='body', skip=True) == ['two']
  assert read_all(path, key='text, body', skip=True) == ['one', 'two', 'four']  # The first key each line has.
  pq.write_table(pa.table({'text': ['a', None, 'c']}), tmp_path / 'nulls.parquet')
  with pytest.raises(ConfigError, match=r"nulls.parquet \(row 1 of row group 0\) has no text in its 'text' column"):
    read_all(tmp_path / 'nulls.parquet')
  assert read_all(tmp_path / 'nulls.parquet', skip=True) == ['a', 'c']
  pq.write_table(pa.table({'content': ['a']}), tmp_path / 'other.parquet')
  with pytest.raises(ConfigError, match=r"other.parquet has no column data.text_key='text' .*set data.text_key to its"):
    read_all(tmp_path / 'other.parquet')


def test_a_shard_deleted_mid_run_stops_in_one_sentence_or_is_skipped(tmp_path, caplog):
  directory = write_corpus(tmp_path, shard_count=8)
  cfg = files_cfg(f'{directory}/*.jsonl', batch_size=1, open_shards=1)
  iterator = data.train_iterator(cfg)
  next(iterator)
  for name in os.listdir(directory):
    os.remove(os.path.join(directory, name))
  with pytest.raises(ConfigError, match=r'\d\d.jsonl was deleted or moved while the run read it .*; put it back'):
    take(iterator, 200)
  write_corpus(tmp_path, shard_count=8)
  cfg.data.skip_bad_records = True
  iterator = data.train_iterator(cfg)
  next(iterator)
  os.remove(os.path.join(directory, '07.jsonl'))
  take(iterator, 60)  # Goes on without the shard.
  assert '07.jsonl was deleted or moved' in caplog.text and 'skipping the rest of it' in caplog.text


def write_prepared(directory, documents, tokenizer_setting='byte', split='train', shard_count=2):
  """What python -m nopejax.prepare writes: ArrayRecord shards of token ids and index.json."""
  from array_record.python.array_record_module import ArrayRecordWriter
  os.makedirs(directory, exist_ok=True)
  entries = []
  for shard in range(shard_count):
    name = f'{split}-{shard:05d}-of-{shard_count:05d}.array_record'
    writer = ArrayRecordWriter(os.path.join(directory, name), 'group_size:1')
    mine = documents[shard::shard_count]
    for ids in mine:
      writer.write(shards.encode_record(ids))
    writer.close()
    entries.append({'file': name, 'documents': len(mine), 'tokens': int(sum(map(len, mine)))})
  shards.write_index(directory, {'tokenizer': shards.tokenizer_identity(tokenizer_setting), 'shards': entries,
                                 'split': split})
  return str(directory)


def test_shards_prepared_with_another_tokenizer_are_refused(tmp_path):
  model = tmp_path / 'other.model'
  model.write_bytes(b'not the byte tokenizer')
  directory = write_prepared(tmp_path / 'prepared', [np.arange(5)], tokenizer_setting=str(model))
  with pytest.raises(ConfigError, match=r'prepared with another tokenizer \(sentencepiece, sha256 .*\) than '
                                        r"data.tokenizer='byte' .*; set data.tokenizer to the one the shards"):
    data.train_iterator(files_cfg(directory))
  os.remove(os.path.join(directory, 'index.json'))
  with pytest.raises(ConfigError, match=r'index.json does not exist, so .* is not a complete prepared'):
    data.train_iterator(files_cfg(directory + '/*.array_record'))


def test_the_command_line_ends_in_one_sentence_with_exit_code_2(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'nopejax.train', '--config', 'configs/tiny.py', '--workdir', str(tmp_path / 'run'),
       '--config.data.dataset=files', f'--config.data.train_files={tmp_path}/none/*.jsonl.zst'],
      capture_output=True, text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  assert result.returncode == 2, result.stderr[-2000:]
  assert re.search(r"error: data.train_files='.*none/\*.jsonl.zst' matches no files; fix the glob", result.stderr)


# ------------------------------------------------------------------ Training.

def read_losses(workdir, first, last):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    by_step = {m['step']: m['loss'] for m in map(json.loads, f)}
  return [by_step[s] for s in range(first, last + 1)]


def prose(seed, count):
  rng = np.random.default_rng(seed)
  words = ['the', 'model', 'reads', 'shards', 'in', 'place', 'and', 'packs', 'documents', 'into', 'windows']
  return [' '.join(rng.choice(words, int(rng.integers(5, 40)))) for _ in range(count)]


def train_cfg(train_files, eval_files):
  cfg = small_config()
  cfg.data.dataset = 'files'
  cfg.data.train_files = train_files
  cfg.data.eval_files = eval_files
  cfg.data.shuffle_buffer = 8
  cfg.data.open_shards = 2
  cfg.train.steps = 12
  cfg.train.checkpoint_every = 4
  cfg.train.eval_every = 6
  return cfg


def test_a_tiny_model_trains_from_zst_and_parquet_shards_in_place_and_resumes_exactly(tmp_path):
  for shard in range(4):
    write_shard(tmp_path / f'{shard}.jsonl.zst', prose(shard, 30))
    write_shard(tmp_path / f'{shard}.parquet', prose(10 + shard, 30))
  write_shard(tmp_path / 'eval.jsonl', prose(99, 30))
  cfg = train_cfg(f'{tmp_path}/*.jsonl.zst,{tmp_path}/*.parquet', f'{tmp_path}/eval.jsonl')
  cfg.train.eval_every = 0  # Evaluation on eval_files: the prepared-shards run below.
  loop.run(cfg, str(tmp_path / 'whole'))
  cfg.train.stop_after = 5
  loop.run(cfg, str(tmp_path / 'stopped'))
  cfg.train.stop_after = 0
  loop.run(cfg, str(tmp_path / 'stopped'))  # Resumes at step 5, every shard's position included.
  assert read_losses(tmp_path / 'stopped', 6, 12) == read_losses(tmp_path / 'whole', 6, 12)


def test_a_tiny_model_trains_from_beam_prepared_shards_and_resumes_exactly(tmp_path):
  pytest.importorskip('apache_beam')
  from nopejax import prepare
  for shard in range(3):
    write_shard(tmp_path / f'{shard}.jsonl.zst', prose(shard, 20))
  write_shard(tmp_path / 'eval.parquet', prose(9, 20))
  cfg = train_cfg(f'{tmp_path}/*.jsonl.zst', f'{tmp_path}/eval.parquet')
  one_process = ['--direct_num_workers=1', '--direct_running_mode=in_memory']
  prepare.run(cfg, str(tmp_path / 'train'), 'train', one_process)
  prepare.run(cfg, str(tmp_path / 'eval'), 'eval', one_process)
  cfg.data.train_files, cfg.data.eval_files = str(tmp_path / 'train'), str(tmp_path / 'eval')
  cfg.train.steps = 6
  cfg.train.eval_every = 6
  metrics = loop.run(cfg, str(tmp_path / 'whole'))
  assert np.isfinite(metrics['loss']) and np.isfinite(metrics['eval_loss'])
  cfg.train.stop_after = 3
  loop.run(cfg, str(tmp_path / 'stopped'))
  cfg.train.stop_after = 0
  loop.run(cfg, str(tmp_path / 'stopped'))  # Resumes at step 3: the rows' positions in the token shards.
  assert read_losses(tmp_path / 'stopped', 4, 6) == read_losses(tmp_path / 'whole', 4, 6)


def test_a_bad_record_mid_run_stops_the_run_and_keeps_its_checkpoints(tmp_path):
  texts = prose(0, 20)
  write_shard(tmp_path / 'a.jsonl', texts)
  with open(tmp_path / 'a.jsonl', 'a') as f:
    f.write('{"body": "no text here"}\n')
  write_shard(tmp_path / 'eval.jsonl', prose(1, 10))
  cfg = train_cfg(f'{tmp_path}/a.jsonl', f'{tmp_path}/eval.jsonl')
  cfg.data.open_shards = 1
  cfg.data.shuffle_buffer = 0
  cfg.train.steps = 200
  cfg.train.eval_every = 4  # Raw eval_files too, read from their start every time.
  with pytest.raises(ConfigError, match=r'a.jsonl:21 has no string field'):
    loop.run(cfg, str(tmp_path / 'run'))
  assert os.listdir(tmp_path / 'run' / 'checkpoints')  # Saved steps stay.
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    assert any('eval_loss' in json.loads(line) for line in f)
