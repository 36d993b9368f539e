"""Tests for nopejax.prepare: the Beam pipeline's shards equal, token for token, a single process's
and the tokenizer's own output; the index counts; bad input ends in one sentence and exit code 2."""
import gzip
import json
import os
import pathlib
import subprocess
import sys

import pytest

from nopejax import config, data, prepare
from nopejax.data import shards

ROOT = pathlib.Path(__file__).resolve().parent.parent
ONE_PROCESS = ('--direct_num_workers=1', '--direct_running_mode=in_memory')


def _docs(name, count):
  return [f'{name} document {i}: the quick brown fox {i * 7} jumps over the lazy dog. ' * (1 + i % 3)
          + 'naïve – ∑' * (i % 2) for i in range(count)]


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """Shards in four formats, and a SentencePiece model trained on them. Returns the directory, the
  model path and each file's documents in the sorted file order that numbers the output shards."""
  sentencepiece = pytest.importorskip('sentencepiece')
  root = tmp_path_factory.mktemp('corpus')
  files = {'a.jsonl': _docs('a', 9), 'b.jsonl.gz': _docs('b', 5), 'c.txt': ['a whole file is one document\n'],
           'd.jsonl.zst': _docs('d', 7)}
  lines = {name: ''.join(json.dumps({'text': t, 'id': i}) + '\n' for i, t in enumerate(docs))
           for name, docs in files.items()}
  (root / 'a.jsonl').write_text(lines['a.jsonl'] + '\n' + json.dumps({'text': ''}) + '\n')  # Blank and empty: no documents.
  (root / 'b.jsonl.gz').write_bytes(gzip.compress(lines['b.jsonl.gz'].encode()))
  (root / 'c.txt').write_text(files['c.txt'][0])
  zstandard = pytest.importorskip('zstandard')
  (root / 'd.jsonl.zst').write_bytes(zstandard.ZstdCompressor().compress(lines['d.jsonl.zst'].encode()))
  sp = tmp_path_factory.mktemp('tokenizer')
  (sp / 'text').write_text('\n'.join(t for docs in files.values() for t in docs))
  sentencepiece.SentencePieceTrainer.train(input=str(sp / 'text'), model_prefix=str(sp / 'sp'), vocab_size=56,
                                           minloglevel=2)
  return root, str(sp / 'sp.model'), [files[name] for name in sorted(files)]


def _cfg(corpus, tokenizer='sp'):
  root, model, _ = corpus
  cfg = config.get_config()
  cfg.data.train_files = f'{root}/*.jsonl*,{root}/*.txt'
  cfg.data.tokenizer = model if tokenizer == 'sp' else tokenizer
  return cfg


def _records(directory):
  from array_record.python import array_record_module
  index = shards.read_index(directory)
  out = []
  for shard in index['shards']:
    reader = array_record_module.ArrayRecordReader(str(pathlib.Path(directory) / shard['file']))
    out.append([shards.decode_record(r).tolist() for r in reader.read_all()])
    reader.close()
  return out


def _prepare_cli(*args):
  return subprocess.run([sys.executable, '-m', 'nopejax.prepare', *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu'))


def test_two_direct_runner_workers_write_what_one_process_writes(corpus, tmp_path):
  pytest.importorskip('apache_beam')
  cfg = _cfg(corpus)
  # The command line with its default runner: the DirectRunner's engine, two worker processes.
  result = _prepare_cli('--config', 'configs/tiny.py', f'--config.data.train_files={cfg.data.train_files}',
                        f'--config.data.tokenizer={cfg.data.tokenizer}', '--out', str(tmp_path / 'two'))
  assert result.returncode == 0, result.stderr[-3000:]
  assert '4 shards, 22 documents' in result.stdout
  one = prepare.run(cfg, str(tmp_path / 'one'), beam_args=ONE_PROCESS)

  names = sorted(p.name for p in (tmp_path / 'two').iterdir())
  assert names == sorted(p.name for p in (tmp_path / 'one').iterdir())
  assert names == ['index.json'] + [f'train-0000{i}-of-00004.array_record' for i in range(4)]
  for name in names:  # Byte for byte, whatever the number of workers.
    assert (tmp_path / 'two' / name).read_bytes() == (tmp_path / 'one' / name).read_bytes(), name

  # Token for token what the run's tokenizer makes of each document, BOS first, in file order.
  tokenizer = data.make_tokenizer(cfg)
  expected = [[data.encode_document(tokenizer, t).tolist() for t in docs] for docs in corpus[2]]
  assert _records(tmp_path / 'two') == expected
  assert all(doc[0] == tokenizer.bos_id for docs in expected for doc in docs)

  assert one['split'] == 'train'
  assert one['tokenizer'] == {'kind': 'sentencepiece', 'hash': shards.tokenizer_hash(cfg)}
  assert [s['documents'] for s in one['shards']] == [len(docs) for docs in expected] == [9, 5, 1, 7]
  assert [s['tokens'] for s in one['shards']] == [sum(map(len, docs)) for docs in expected]


def test_byte_tokenized_eval_split_written_to_a_bucket(corpus, tmp_path, gcs):
  pytest.importorskip('apache_beam')
  cfg = _cfg(corpus, tokenizer='byte')
  cfg.data.eval_files, cfg.data.train_files = cfg.data.train_files, ''
  index = prepare.run(cfg, str(tmp_path / 'eval'), split='eval', beam_args=ONE_PROCESS)
  # gs:// (an offline one): the shards are written locally, then copied up; the same bytes.
  assert prepare.run(cfg, 'gs://bucket/tokens/eval', split='eval', beam_args=ONE_PROCESS) == index
  in_bucket = gcs.objects()
  for shard in index['shards']:
    assert in_bucket[f'bucket/tokens/eval/{shard["file"]}'] == (tmp_path / 'eval' / shard['file']).read_bytes()
  assert index['split'] == 'eval'
  assert [s['file'] for s in index['shards']] == [f'eval-0000{i}-of-00004.array_record' for i in range(4)]
  assert index['tokenizer'] == {'kind': 'byte', 'hash': shards.tokenizer_identity('byte')['hash']}
  texts = [t for docs in corpus[2] for t in docs]
  assert sum(s['tokens'] for s in index['shards']) == sum(len(t.encode()) for t in texts)
  assert [bytes(doc).decode() for docs in _records(tmp_path / 'eval') for doc in docs] == texts


def test_bad_input_is_refused_before_anything_is_written(corpus, tmp_path, monkeypatch):
  cfg = _cfg(corpus)
  cases = []

  def refused(match, cfg=cfg, out=str(tmp_path / 'out'), **kwargs):
    with pytest.raises(config.ConfigError, match=match):
      prepare.run(cfg, out, **kwargs)
    cases.append(match)

  refused('data.eval_files', split='eval')  # Nothing set for the split.
  nothing = _cfg(corpus)
  nothing.data.train_files = str(tmp_path / 'missing' / '*.jsonl')
  refused('matches no files', cfg=nothing)
  refused('Unexpected argument', beam_args=['DataflowRunner'])
  refused('shared storage such as gs:', beam_args=['--runner=DataflowRunner', '--project=p'])
  bad_tokenizer = _cfg(corpus, tokenizer=str(tmp_path / 'missing.model'))
  refused('data.tokenizer', cfg=bad_tokenizer)
  (tmp_path / 'a_file').write_text('')
  refused('cannot be written', out=str(tmp_path / 'a_file' / 'out'))
  assert not (tmp_path / 'out').exists()  # No check above created the output directory.
  with monkeypatch.context() as m:
    m.setitem(sys.modules, 'apache_beam', None)  # As if not installed.
    refused(r"pip install 'nopejax\[beam\]'")

  # A bad record, found by a worker: its sentence, and what to do with the unfinished output.
  (tmp_path / 'bad').mkdir()
  (tmp_path / 'bad' / 'x.jsonl').write_text('{"text": "fine"}\nnot json\n')
  bad_record = _cfg(corpus, tokenizer='byte')
  bad_record.data.train_files = str(tmp_path / 'bad' / 'x.jsonl')
  with pytest.raises(config.ConfigError, match=r'x.jsonl:2 is not valid JSON.*then empty .*without index.json'):
    prepare.run(bad_record, str(tmp_path / 'bad_out'), beam_args=ONE_PROCESS)

  # A non-empty output directory, through the command line: one sentence, exit code 2.
  (tmp_path / 'full').mkdir()
  (tmp_path / 'full' / 'index.json').write_text('{}')
  result = _prepare_cli('--config', 'configs/tiny.py', f'--config.data.train_files={cfg.data.train_files}',
                        '--out', str(tmp_path / 'full'))
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith('error: --out') and 'not empty' in result.stderr
  assert 'Traceback' not in result.stderr
