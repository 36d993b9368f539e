"""Tests for nopejax.data.sources: the pystdlib and textdir corpora, their splits and their errors."""
import concurrent.futures
import hashlib
import json
import os
import pathlib
import socket
import subprocess
import sysconfig
import time

import pytest
from tensorflow_datasets.core import shuffle as tfds_shuffle

from corpus_files import make_cfg, write_files
from nopejax import data
from nopejax.data import prepared, sources


def split_names(cfg, split):
  return [example['name'].decode() for example in data.load_split(cfg, split)]


def test_pystdlib_splits_are_deterministic_and_disjoint(tfds_dir):
  cfg = make_cfg(tfds_dir)
  names = {split: split_names(cfg, split) for split in data.SPLITS}
  assert names == {split: split_names(cfg, split) for split in data.SPLITS}  # Deterministic.
  sets = {split: set(split_names) for split, split_names in names.items()}
  assert not sets['train'] & sets['validation']
  assert not sets['train'] & sets['test']
  assert not sets['validation'] & sets['test']
  for split, (low, high) in {'train': (0, 90), 'validation': (90, 95), 'test': (95, 100)}.items():
    assert all(low <= int(hashlib.md5(n.encode()).hexdigest(), 16) % 100 < high for n in names[split])
    assert names[split] == sorted(names[split])  # File order.
  # Every non-empty stdlib .py file outside site-packages, once.
  root = pathlib.Path(sysconfig.get_paths()['stdlib'])
  expected = {path.relative_to(root).as_posix() for path in root.rglob('*.py')
              if 'site-packages' not in path.relative_to(root).parts and path.stat().st_size > 0}
  assert set().union(*sets.values()) == expected
  assert 1500 < len(expected) < 2100
  assert len(names['train']) > 0.85 * len(expected)
  example = data.load_split(cfg, 'validation')[0]
  path = root / example['name'].decode()
  assert example['text'].decode() == path.read_text(encoding='utf-8', errors='replace')


def test_textdir_reads_txt_and_jsonl_with_text_key(tmp_path, tfds_dir, monkeypatch):
  # Spill to tfds's temporary bucket files after 1 KB instead of 1 GB, as a big corpus does: that
  # path needs tensorflow unless nopejax.data.sources stands in for it.
  monkeypatch.setattr(tfds_shuffle, 'MAX_MEM_BUFFER_SIZE', 1000)
  lines = [json.dumps({'content': f'jsonl document {i}', 'id': i}) for i in range(100)]
  lines[5] = ''  # Blank lines are skipped.
  lines[6] = json.dumps({'content': ''})  # And so are empty documents.
  text_dir = write_files(tmp_path / 'corpus', {
      'a.txt': 'first text document',
      'sub/b.txt': 'second text document',
      'c.jsonl': '\n'.join(lines) + '\n',
      'ignored.md': 'not a document',
  })
  cfg = make_cfg(tfds_dir, dataset='textdir', text_dir=text_dir, text_key='content')
  texts = {}
  for split in data.SPLITS:
    for example in data.load_split(cfg, split):
      texts[example['name'].decode()] = example['text'].decode()
  expected = {'a.txt': 'first text document', 'sub/b.txt': 'second text document'}
  expected.update({f'c.jsonl:{i + 1}': f'jsonl document {i}' for i in range(100) if i not in (5, 6)})
  assert texts == expected
  train_names = split_names(cfg, 'train')
  line_numbers = [int(name.split(':')[1]) for name in train_names if name.startswith('c.jsonl:')]
  assert line_numbers == sorted(line_numbers) and len(line_numbers) > 80  # File order.

  cfg.data.text_key = 'missing'
  with pytest.raises(ValueError, match='data.text_key'):
    data.load_split(cfg, 'train')


def test_big_splits_spread_over_tfds_buckets():
  # tfds sorts each of its 1000 spill buckets in memory: about 1 GB of text per bucket, in order.
  buckets = [tfds_shuffle.get_bucket_number(hkey=sources._example_key(chars), num_buckets=1000)
             for chars in (0, 10**9 // 2, 5 * 10**9, 2**40 - 1)]
  assert buckets == [0, 0, 4, 999]


def test_textdir_split_subdirectories(tmp_path, tfds_dir):
  text_dir = write_files(tmp_path / 'corpus', {
      'train/t1.txt': 'one', 'train/deep/t2.txt': 'two', 'train/t3.jsonl': '{"text": "three"}\n',
      'validation/v1.txt': 'four', 'test/x1.txt': 'five'})
  cfg = make_cfg(tfds_dir, dataset='textdir', text_dir=text_dir)
  assert split_names(cfg, 'train') == ['train/deep/t2.txt', 'train/t1.txt', 'train/t3.jsonl:1']
  assert split_names(cfg, 'validation') == ['validation/v1.txt']
  assert split_names(cfg, 'test') == ['test/x1.txt']


def test_textdir_errors_name_the_key(tmp_path, tfds_dir):
  (tmp_path / 'empty').mkdir()
  cfg = make_cfg(tfds_dir, dataset='textdir', text_dir=str(tmp_path / 'empty'))
  with pytest.raises(ValueError, match='data.text_dir'):
    data.load_split(cfg, 'train')
  cfg.data.text_dir = str(tmp_path / 'missing')
  with pytest.raises(ValueError, match='data.text_dir'):
    data.load_split(cfg, 'train')
  cfg.data.text_dir = write_files(tmp_path / 'blank', {'a.txt': '', 'b.jsonl': '{"text": ""}\n'})
  with pytest.raises(ValueError, match='data.text_dir'):
    data.load_split(cfg, 'train')
  cfg.data.text_dir = write_files(tmp_path / 'only_train', {'train/a.txt': 'text'})
  with pytest.raises(ValueError, match='data.text_dir'):
    data.load_split(cfg, 'test')  # An empty split.
  cfg.data.dataset = 'wikipedia'
  with pytest.raises(ValueError, match="data.dataset.*pystdlib"):
    data.load_split(cfg, 'train')


@pytest.mark.parametrize('files, message', [
    ({'train/a.jsonl': '{"text": "fine"}\n{"text": "cut off\n'},
     r'train/a.jsonl:2 is not valid JSON \(Unterminated string starting at, column 10\); fix or delete that line'),
    ({'train/a.jsonl': '["a list"]\n'}, r'train/a.jsonl:1 is a JSON list, not an object; .jsonl files hold one JSON object'),
    ({'train/a.jsonl': '{"text": ["a", "b"]}\n'},
     r"The 'text' field of .*train/a.jsonl:1 is a list, not a string; store the text as a string there"),
    ({'train/a.txt': 'caf\u00e9'.encode('latin-1')},
     r'train/a.txt is not UTF-8 text \(byte 0xe9 at offset 3\); convert it to UTF-8 or remove it'),
    ({'train/a.txt': b'\x7fELF\x02\x01\x01\x00\x00'}, r'train/a.txt holds NUL bytes, so it is binary, not text; remove it'),
], ids=['malformed_jsonl', 'jsonl_not_an_object', 'text_not_a_string', 'not_utf8', 'binary'])
def test_bad_corpus_files_are_refused_in_one_sentence(tmp_path, tfds_dir, files, message):
  cfg = make_cfg(tfds_dir, dataset='textdir', text_dir=write_files(tmp_path / 'corpus', files))
  with pytest.raises(ValueError, match=message):
    data.load_split(cfg, 'train')


def test_corpus_changed_after_preparation_is_refused(tmp_path, tfds_dir, monkeypatch):
  text_dir = write_files(tmp_path / 'changing', {'train/a.txt': 'first', 'train/b.txt': 'second'})
  cfg = make_cfg(tfds_dir, dataset='textdir', text_dir=text_dir)
  assert len(data.load_split(cfg, 'train')) == 2
  (tmp_path / 'changing' / 'train' / 'b.txt').write_text('second, longer now')
  monkeypatch.setattr(sources, '_checked_sources', set())  # As a new run, a new process, would.
  with pytest.raises(ValueError, match=r'data.text_dir=.* changed since it was prepared into .* \(first difference:'
                                       r' train/b.txt\); delete .* to prepare it again, or restore the files'):
    data.load_split(cfg, 'train')


def test_a_file_edited_in_place_with_its_size_kept_is_noticed(tmp_path, tfds_dir, monkeypatch):
  text_dir = write_files(tmp_path / 'edited', {'train/a.txt': 'first', 'train/b.txt': 'second'})
  cfg = make_cfg(tfds_dir, dataset='textdir', text_dir=text_dir)
  assert len(data.load_split(cfg, 'train')) == 2
  time.sleep(0.05)  # Past the file system's timestamp granularity.
  (tmp_path / 'edited' / 'train' / 'b.txt').write_text('SECOND')
  monkeypatch.setattr(sources, '_checked_sources', set())
  with pytest.raises(ValueError, match=r'changed since it was prepared into .* \(first difference: train/b.txt\)'):
    data.load_split(cfg, 'train')
  # Restored (a new mtime, the old bytes): served again.
  (tmp_path / 'edited' / 'train' / 'b.txt').write_text('second')
  assert len(data.load_split(cfg, 'train')) == 2


def test_a_deleted_shard_is_one_sentence_naming_it(tmp_path):
  cfg = make_cfg(str(tmp_path / 'tfds'), dataset='textdir',
                 text_dir=write_files(tmp_path / 'corpus', {'train/a.txt': 'first', 'train/b.txt': 'second'}))
  builder = sources._prepared_builder(cfg)
  shard = builder.info.splits['train'].filepaths[0]
  os.remove(shard)
  with pytest.raises(ValueError, match=rf'The prepared shard {shard} is missing .*; delete {builder.data_dir} to '
                                       'prepare it again.'):
    data.load_split(cfg, 'train')


def _counting_preparations(monkeypatch):
  prepared_count = []
  generators = sources.Textdir._split_generators
  monkeypatch.setattr(sources.Textdir, '_split_generators',
                      lambda self, dl_manager: prepared_count.append(1) or generators(self, dl_manager))
  monkeypatch.setattr(prepared, 'POLL_SECONDS', 0.05)
  return prepared_count


def test_a_second_preparation_at_once_waits_for_the_first_and_reuses_it(tmp_path, monkeypatch):
  cfg = make_cfg(str(tmp_path / 'tfds'), dataset='textdir',
                 text_dir=write_files(tmp_path / 'corpus', {'train/a.txt': 'first', 'train/b.txt': 'second'}))
  preparations = _counting_preparations(monkeypatch)
  builder, download_config = sources._builder(cfg)
  with concurrent.futures.ThreadPoolExecutor(1) as second:
    with prepared.one_at_a_time(builder.data_dir):  # The first process, preparing.
      waiting = second.submit(data.load_split, cfg, 'train')
      time.sleep(0.5)
      assert not waiting.done()
      builder.download_and_prepare(download_config=download_config)
    assert len(waiting.result(timeout=120)) == 2
  assert len(preparations) == 1 and not os.path.exists(f'{builder.data_dir}.preparing')


def test_the_lock_of_a_preparation_that_died_is_taken_over(tmp_path, monkeypatch):
  cfg = make_cfg(str(tmp_path / 'tfds'), dataset='textdir',
                 text_dir=write_files(tmp_path / 'corpus', {'train/a.txt': 'first', 'train/b.txt': 'second'}))
  preparations = _counting_preparations(monkeypatch)
  dead = subprocess.Popen(['true'])
  dead.wait()
  lock = pathlib.Path(f'{sources._builder(cfg)[0].data_dir}.preparing')
  lock.parent.mkdir(parents=True)
  lock.write_text(f'{socket.gethostname()} {dead.pid}')
  assert len(data.load_split(cfg, 'train')) == 2 and len(preparations) == 1 and not lock.exists()
