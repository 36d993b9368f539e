"""Workdirs, data and outputs on gs://: a whole pretrain, resume, search and evaluation on an offline
GCS, with no gs:// path ever reaching os.path or the local disk."""
import builtins
import json
import os

import numpy as np
import pytest
from etils import epath

import nopejax
from conftest import small_config
from nopejax import evaluate, loop, paths
from nopejax import metrics as metrics_lib

EVAL_OVERRIDES = {'eval.lengths': (16, 64), 'eval.max_tokens': 64, 'eval.batch_size': 4, 'eval.passkey_keys': 0,
                  'eval.entropy_documents': 2, 'eval.position_documents': 2, 'eval.query_chunk': 64}


def test_is_url_and_resolve():
  assert paths.is_url('gs://bucket/run') and not paths.is_url('runs/tiny')
  assert str(paths.resolve('gs://bucket/run')) == 'gs://bucket/run'
  assert str(paths.resolve('runs/tiny')) == os.path.join(os.getcwd(), 'runs/tiny')


@pytest.fixture
def no_url_on_local_disk(monkeypatch):
  """Records every call that would treat a gs:// path as a local one (os.path, os, open)."""
  touched = []

  def guard(module, name):
    original = getattr(module, name)

    def guarded(*args, **kwargs):
      for arg in args[:2]:
        if isinstance(arg, (str, os.PathLike)) and os.fspath(arg).startswith('gs:'):
          touched.append(f'{name}({os.fspath(arg)})')
      return original(*args, **kwargs)

    monkeypatch.setattr(module, name, guarded)

  for name in ('abspath', 'realpath', 'exists', 'isdir', 'isfile', 'getsize'):
    guard(os.path, name)
  for name in ('makedirs', 'mkdir', 'listdir', 'scandir', 'remove', 'rename', 'replace'):
    guard(os, name)
  guard(builtins, 'open')
  return touched


def write_corpus(root):
  rng = np.random.default_rng(0)
  words = ['def', 'return', 'import', 'class', 'self', 'value', 'None', 'print', 'for', 'in']
  for split, count in (('train', 24), ('validation', 4), ('test', 4)):
    for i in range(count):
      text = ' '.join(rng.choice(words, int(rng.integers(20, 120)))) + '\n'
      epath.Path(f'{root}/{split}/doc{i:02d}.txt').write_text(text)


def test_pretrain_resume_search_and_evaluate_on_gcs(gcs, no_url_on_local_disk, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # A stray local 'gs:' directory would appear here.
  write_corpus('gs://bucket/corpus')
  cfg = small_config()
  cfg.data.dataset, cfg.data.text_dir, cfg.data.tfds_dir = 'textdir', 'gs://bucket/corpus', 'gs://bucket/tfds'
  cfg.train.steps, cfg.train.stop_after, cfg.train.warmup_steps = 8, 5, 2
  cfg.train.checkpoint_every, cfg.train.keep_checkpoints, cfg.train.eval_every = 2, 2, 4
  loop.run(cfg, 'gs://bucket/pretrain')
  cfg.train.stop_after = 0
  loop.run(cfg, 'gs://bucket/pretrain')  # Resumes from gs://bucket/pretrain/checkpoints/5.

  search_cfg = small_config()
  search_cfg.data.dataset, search_cfg.data.text_dir, search_cfg.data.tfds_dir = cfg.data.dataset, cfg.data.text_dir, cfg.data.tfds_dir
  search_cfg.data.seq_len, search_cfg.train.trainable, search_cfg.search.base = 32, 'temperature', 'gs://bucket/pretrain'
  search_cfg.train.steps, search_cfg.train.warmup_steps, search_cfg.train.learning_rate = 2, 1, 0.1
  loop.run(search_cfg, 'gs://bucket/search')
  results = evaluate.evaluate('gs://bucket/search', EVAL_OVERRIDES)
  evaluate.compare(['gs://bucket/search'], 'gs://bucket/compare')
  model, _ = nopejax.load('gs://bucket/search')

  assert no_url_on_local_disk == [] and not os.path.exists(tmp_path / 'gs:')
  stored = gcs.objects()
  metrics = metrics_lib.read_metrics('gs://bucket/pretrain')
  assert 'bucket/pretrain/metrics.jsonl' not in stored  # Appended as part objects, never rewritten.
  assert [m['step'] for m in metrics] == list(range(1, 9))
  assert json.loads(stored['bucket/pretrain/config.json'])['data']['text_dir'] == 'gs://bucket/corpus'
  steps = {name.split('/')[3] for name in stored if name.startswith('bucket/pretrain/checkpoints/')}
  assert steps == {'6', '8'}  # Saved at 2, 4, 5, 6, 8; orbax deleted the older ones on gs:// too.
  assert any(name.startswith('bucket/pretrain/tensorboard/events.out.tfevents') for name in stored)
  assert any(name.startswith('bucket/tfds/textdir/') and '.array_record' in name for name in stored)
  for name in ('temperatures.json', 'temperatures.png', 'eval/results.json', 'eval/report.md', 'eval/perplexity.png'):
    assert f'bucket/search/{name}' in stored, name
  assert stored['bucket/search/eval/perplexity.png'][:8] == b'\x89PNG\r\n\x1a\n'
  assert {'bucket/compare/compare.png', 'bucket/compare/compare.md'} <= set(stored)
  assert results['kind'] == 'search' and results['pretrain_length'] == 16
  assert model.blocks[0].attention.temperature[...].shape == (4,)
