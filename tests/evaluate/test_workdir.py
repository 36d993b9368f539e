"""evaluate(workdir): every measurement on a small trained workdir, the report and plots it writes,
the comparison of evaluated runs, the overrides it accepts, and the command line."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import small_config
from nopejax import checkpoint, evaluate, loop
from nopejax.config import ConfigError


def test_default_lengths_and_stride_follow_the_pretraining_length():
  cfg = small_config()
  assert evaluate.eval_lengths(cfg, 16) == ([16, 32, 64, 128, 256], 4)
  assert evaluate.eval_lengths(cfg, 2048) == ([2048, 4096, 8192, 16384, 32768], 256)
  cfg.eval.lengths = (64, 32)
  cfg.eval.stride = 8
  assert evaluate.eval_lengths(cfg, 16) == ([32, 64], 8)
  cfg.eval.stride = 32
  with pytest.raises(ConfigError, match='not longer than the stride 32'):
    evaluate.eval_lengths(cfg, 16)
  cfg.eval.lengths = (16, '(16,x)')  # What config_flags makes of a typo.
  with pytest.raises(ConfigError, match='must hold positive integers'):
    evaluate.eval_lengths(cfg, 16)


EVAL_OVERRIDES = {
    'eval.lengths': (16, 64, 384),  # 384 is the shortest here that holds the passkey template and a sentence.
    'eval.max_tokens': 128,
    'eval.passkey_depths': 2,
    'eval.passkey_keys': 2,
    'eval.entropy_documents': 2,
    'eval.position_documents': 4,
    'eval.query_chunk': 64,
}


@pytest.fixture(scope='module')
def pretrained(small_run):
  return small_run[1]


@pytest.fixture(scope='module')
def evaluated(pretrained):
  base = evaluate.evaluate(pretrained, EVAL_OVERRIDES)
  with open(os.path.join(pretrained, 'eval', 'results.json')) as f:
    base_json = f.read()
  scaled = evaluate.evaluate(pretrained, dict(EVAL_OVERRIDES, **{'model.temperature': 1.5}))
  return pretrained, base, scaled, base_json


def test_evaluate_writes_results_with_the_schema_plots_and_report(evaluated):
  workdir, results, _, _ = evaluated
  out = os.path.join(workdir, 'eval')
  with open(os.path.join(out, 'results.json')) as f:
    saved = json.load(f)
  assert saved['perplexity'].keys() == {'16', '64', '384'}
  assert all(isinstance(v, float) and 1 < v < 256 for v in saved['perplexity'].values())
  assert saved['passkey']['16'] is None and saved['passkey']['64'] is None  # The template does not fit.
  assert 0.0 <= saved['passkey']['384'] <= 1.0 and saved['passkey_detail']['384']['prompts'] == 4
  assert saved['perplexity_detail']['16']['tokens'] == 128 and saved['stride'] == 4  # min(256, 16 // 4)
  assert saved['kind'] == 'pretrain' and saved['pretrain_length'] == 16 and saved['search_length'] is None
  entropy = np.array([saved['entropy_mean'][str(i)] for i in range(1, 385)])
  assert len(saved['entropy_mean']) == 384 and entropy[0] == 0.0
  assert np.all(entropy <= np.log(np.arange(1, 385)) + 1e-5)
  assert len(saved['loss_by_position']) == 384 and list(saved['loss_by_band']) == [
      '0-16', '16-32', '32-64', '64-128', '128-256', '256-384']
  assert np.array(saved['entropy_last']).shape == (2, 4) and np.array(saved['temperatures']).shape == (2, 4)
  assert np.array(saved['entropy_by_layer']['values']).shape == (2, len(saved['entropy_by_layer']['positions']))
  assert saved['config']['eval']['lengths'] == [16, 64, 384] and saved['temperature_override'] is None
  assert saved['position_documents'] == 4 and saved['entropy_documents'] == 2
  with open(os.path.join(out, 'report.md')) as f:
    report = f.read()
  for name in ('perplexity.png', 'loss_by_position.png', 'entropy.png', 'entropy_heatmap.png', 'passkey.png'):
    with open(os.path.join(out, name), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    assert f'![{name}]({name})' in report
  assert np.load(os.path.join(out, 'entropy.npz'))['entropy_LxHxN'].shape == (2, 4, 384)
  assert results['perplexity'] == saved['perplexity']


def test_temperature_override_sets_every_head_and_writes_beside_the_base_results(evaluated):
  workdir, base, scaled, base_json = evaluated
  assert np.all(np.array(base['temperatures']) == 1.0)
  assert base['temperature_schedule'] == 'constant' and 'temperature_slopes' not in base
  assert np.all(np.array(scaled['temperatures']) == 1.5) and scaled['temperature_override'] == 1.5
  assert scaled['label'] == f'{os.path.basename(workdir)} c=1.5'
  assert os.path.isfile(os.path.join(workdir, 'eval_c1.5', 'results.json'))
  with open(os.path.join(workdir, 'eval', 'results.json')) as f:
    assert f.read() == base_json  # Not overwritten.
  assert scaled['perplexity']['384'] != base['perplexity']['384']


def test_compare_overlays_runs_in_one_plot_and_one_table(evaluated, tmp_path):
  workdir = evaluated[0]
  label = os.path.basename(workdir)
  summary = evaluate.compare([workdir, os.path.join(workdir, 'eval_c1.5')], str(tmp_path))
  assert summary['runs'] == [label, f'{label} c=1.5']
  with open(tmp_path / 'compare.md') as f:
    table = f.read()
  assert '| run | 16 | 64 | 384 |' in table
  assert re.search(rf'\| {label} c=1.5 \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \|', table)
  with open(tmp_path / 'compare.png', 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  with pytest.raises(ConfigError, match='holds no results.json'):
    evaluate.compare([str(tmp_path / 'missing')], str(tmp_path))


def test_search_workdir_gets_its_pretraining_length_and_the_temperature_scatter(pretrained, tfds_dir, tmp_path):
  """A log search (c_h and a_h past the pretraining length 16): results.json holds both, per layer and head."""
  cfg = small_config(tfds_dir)
  cfg.data.seq_len = 32
  cfg.model.temperature_schedule, cfg.model.temperature_length = 'log', 16
  cfg.train.trainable = 'temperature'
  cfg.train.steps = 2
  cfg.train.warmup_steps = 1
  cfg.train.checkpoint_every = 2
  cfg.train.learning_rate = 0.1
  cfg.search.base = pretrained
  cfg.search.init = '1.3'
  loop.run(cfg, str(tmp_path))
  results = evaluate.evaluate(str(tmp_path), dict(EVAL_OVERRIDES, **{
      'eval.lengths': (16, 64), 'eval.passkey_keys': 0}))
  assert results['kind'] == 'search' and results['pretrain_length'] == 16 and results['search_length'] == 32
  assert results['stride'] == 4 and results['passkey'] == {}
  assert np.all(np.array(results['temperatures']) >= 1.0)
  assert results['temperature_schedule'] == 'log'
  slopes = np.array(results['temperature_slopes'])
  assert slopes.shape == (2, 4) and np.any(slopes != 0.0)  # Two steps at lr 0.1 moved them off their start, 0.
  with open(tmp_path / 'temperatures.json') as f:
    np.testing.assert_allclose(slopes, json.load(f)['slopes'], rtol=1e-6)
  assert 'temperature_entropy.png' in results['plots']
  assert os.path.isfile(tmp_path / 'eval' / 'temperature_entropy.png')


def test_a_position_override_rebuilds_the_model_and_writes_beside_the_base_results(evaluated):
  """log-n on the NoPE run: exactly the base perplexity within the training length (16), another past it."""
  workdir, base = evaluated[:2]
  results = evaluate.evaluate(workdir, dict(EVAL_OVERRIDES, **{
      'model.logn': True, 'eval.lengths': (16, 64), 'eval.passkey_keys': 0}))
  assert results['label'] == f'{os.path.basename(workdir)} logn=True'
  assert os.path.isfile(os.path.join(workdir, 'eval_logn=True', 'results.json'))
  assert results['config']['model']['logn'] and results['perplexity']['16'] == base['perplexity']['16']
  assert results['perplexity']['64'] != base['perplexity']['64']
  with pytest.raises(ConfigError, match="model.rope_scaling='yarn' scales RoPE but model.position='nope'"):
    evaluate.evaluate(workdir, dict(EVAL_OVERRIDES, **{'model.rope_scaling': 'yarn'}))


def test_overrides_of_the_trained_model_are_refused(pretrained):
  with pytest.raises(ConfigError, match='model.num_layers describes the trained run'):
    evaluate.evaluate(pretrained, {'model.num_layers': 3})
  with pytest.raises(ConfigError, match='Unknown config key eval.lenghts'):
    evaluate.evaluate(pretrained, {'eval.lenghts': (16,)})


@pytest.mark.parametrize('temperature', [0.0, -1.5])
def test_a_temperature_override_must_be_positive(pretrained, temperature):
  with pytest.raises(ConfigError, match=f'model.temperature={temperature} must be positive .*; set a value like 1.5'):
    evaluate.evaluate(pretrained, {'model.temperature': temperature})
  assert not os.path.exists(os.path.join(pretrained, f'eval_c{temperature:g}'))


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'nopejax.evaluate', *args], capture_output=True, text=True,
                        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), timeout=120)


def test_cli_errors_are_one_sentence_and_exit_2(tmp_path):
  unknown = _cli('--workdir', str(tmp_path), '--config.eval.lenghts=(16,)')
  assert unknown.returncode == 2
  assert unknown.stderr.strip().splitlines()[-1] == (
      'error: Unknown config key eval.lenghts; every key is declared in nopejax/defaults.py, check the spelling there.')
  not_a_run = _cli('--workdir', str(tmp_path / 'nothing'), '--config.eval.lengths=(16,64)')
  assert not_a_run.returncode == 2 and 'is not a nopejax workdir' in not_a_run.stderr.strip().splitlines()[-1]


def test_cli_compare_takes_the_directories_as_arguments(evaluated, tmp_path):
  workdir = evaluated[0]
  result = _cli('--compare', workdir, os.path.join(workdir, 'eval_c1.5'), '--out', str(tmp_path / 'cmp'))
  assert result.returncode == 0, result.stderr[-2000:]
  assert os.path.isfile(tmp_path / 'cmp' / 'compare.md') and os.path.isfile(tmp_path / 'cmp' / 'compare.png')


def test_an_output_that_cannot_be_written_is_refused_before_the_evaluation(pretrained, tmp_path, monkeypatch):
  (tmp_path / 'file').write_text('mine')
  monkeypatch.setattr(checkpoint, 'load_with_step', lambda *args: pytest.fail('evaluated before checking --out'))
  for out, message in ((tmp_path / 'file', 'is a file, not a directory'), (tmp_path / 'file' / 'eval', 'lies under the file')):
    with pytest.raises(ConfigError, match=f'--out {out} {message}'):
      evaluate.evaluate(pretrained, EVAL_OVERRIDES, str(out))
  result = _cli('--compare', pretrained, '--out', str(tmp_path / 'file'))
  assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(
      f'error: --out {tmp_path / "file"} is a file, not a directory')
  assert (tmp_path / 'file').read_text() == 'mine'


def test_a_damaged_newest_step_is_passed_over_and_left_where_it_is(pretrained, tmp_path, caplog):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(pretrained, workdir, ignore=shutil.ignore_patterns('eval*'))
  for root, _, files in os.walk(os.path.join(workdir, 'checkpoints', '40', 'model')):
    for name in files:
      if os.path.basename(root) == 'd':
        with open(os.path.join(root, name), 'wb') as f:
          f.write(b'garbage')
  overrides = dict(EVAL_OVERRIDES, **{'eval.lengths': (16,), 'eval.passkey_keys': 0, 'eval.entropy_documents': 0,
                                      'eval.position_documents': 0})
  results = evaluate.evaluate(workdir, overrides)
  assert results['step'] == 30 and 'checkpoints/40 is damaged' in caplog.text and 'Using step 30 instead' in caplog.text
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['20', '30', '40']  # Evaluation only reads.
