import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import small_config
from nopejax import data, evaluate, loop, model
from nopejax.config import ConfigError

# method.md, section 5, copied by hand: the test fails if the code's template drifts from the paper's.
PAPER_INTRO = ('There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. '
               'I will quiz you about the important information there.\n')
PAPER_GARBAGE = ' The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.'


# ---------------------------------------------------------------------------------------------
# Sliding windows and perplexity.


def test_windows_score_each_windows_last_stride_tokens():
  # Length 10, windows of 4, stride 2: windows start at 0, 2, 4, 6 and score tokens 2-3, 4-5, 6-7, 8-9.
  assert evaluate.window_starts(10, 4, 2) == [0, 2, 4, 6]
  np.testing.assert_array_equal(evaluate.scored_indices(10, 4, 2), [2, 3, 4, 5, 6, 7, 8, 9])
  # One more token does not make another window: token 10 stays unscored.
  assert evaluate.window_starts(11, 4, 2) == [0, 2, 4, 6]
  np.testing.assert_array_equal(evaluate.scored_indices(11, 4, 2), [2, 3, 4, 5, 6, 7, 8, 9])
  np.testing.assert_array_equal(evaluate.scored_indices(4, 4, 3), [1, 2, 3])
  np.testing.assert_array_equal(evaluate.scored_indices(12, 8, 1), [7, 8, 9, 10, 11])


def test_documents_shorter_than_the_window_are_skipped():
  assert evaluate.window_starts(3, 4, 2) == []
  calls = []
  result = evaluate.perplexity([np.arange(3), np.arange(2)], 4, 2, 100, 2, calls.append)
  assert calls == [] and result == {'perplexity': None, 'nll': None, 'windows': 0, 'documents': 0, 'tokens': 0}


def test_perplexity_of_a_bigram_model_matches_a_hand_computation():
  """A stub model with known logits: token t is followed by u with probability softmax(table[t])[u]."""
  rng = np.random.default_rng(0)
  table = rng.normal(size=(5, 5))
  log_probs = table - np.log(np.exp(table).sum(axis=1, keepdims=True))
  short, doc_a, doc_b = np.array([1, 2, 3]), rng.integers(0, 5, 7), rng.integers(0, 5, 9)
  seen = []

  def score_windows(windows_BxN):
    seen.extend(map(tuple, windows_BxN))
    # The window's last 2 tokens, each predicted from the token before it.
    return evaluate.nll_of_logits(jnp.asarray(table)[windows_BxN[:, -3:-1]], windows_BxN[:, -2:])

  result = evaluate.perplexity([short, doc_a, doc_b], 4, 2, 100, 3, score_windows)
  # By hand: doc_a (7 tokens) has windows at 0, 2; doc_b (9 tokens) at 0, 2, 4; short is skipped.
  # Taken round robin: each document's first window, then each one's second, ...
  windows = [doc_a[0:4], doc_b[0:4], doc_a[2:6], doc_b[2:6], doc_b[4:8]]
  window_nll = [-(log_probs[w[1], w[2]] + log_probs[w[2], w[3]]) / 2 for w in windows]
  assert result['windows'] == 5 and result['documents'] == 2 and result['tokens'] == 10
  np.testing.assert_allclose(result['nll'], np.mean(window_nll), rtol=1e-6)
  np.testing.assert_allclose(result['perplexity'], np.exp(np.mean(window_nll)), rtol=1e-6)
  # Two batches of 3 rows; the second padded with a copy of its first row.
  assert seen[:5] == [tuple(w) for w in windows] and len(seen) == 6
  # max_tokens caps the scored tokens: 4 tokens = 2 windows, one from each document.
  capped = evaluate.perplexity([short, doc_a, doc_b], 4, 2, 4, 3, score_windows)
  assert capped['windows'] == 2 and capped['documents'] == 2
  np.testing.assert_allclose(capped['nll'], np.mean(window_nll[:2]), rtol=1e-6)


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


# ---------------------------------------------------------------------------------------------
# Passkey retrieval.


def test_passkey_prompt_matches_the_papers_template_byte_for_byte():
  expected = (PAPER_INTRO + PAPER_GARBAGE * 2
              + '\nThe pass key is 40123. Remember it. 40123 is the pass key.\n'
              + PAPER_GARBAGE * 1 + '\nWhat is the pass key? The pass key is')
  assert evaluate.passkey_prompt(40123, 2, 1).encode('utf-8') == expected.encode('utf-8')


def test_passkey_example_fills_the_length_and_places_the_needle_at_its_depth():
  tokenizer = data.ByteTokenizer()
  garbage = len(PAPER_GARBAGE)
  for depth in (0.0, 0.5, 0.9):
    prompt, answer = evaluate.passkey_example(tokenizer, 12345, depth, 2000)
    assert bytes(answer.astype(np.uint8)) == b' 12345'
    assert 2000 - garbage < len(prompt) + len(answer) <= 2000
    text = bytes(prompt.astype(np.uint8)).decode()
    total = text.count(PAPER_GARBAGE)
    before = text[:text.index('\nThe pass key is 12345.')].count(PAPER_GARBAGE)
    assert before == int(total * depth)
  assert evaluate.passkey_example(tokenizer, 12345, 0.5, 200) is None  # The bare template is ~250 bytes.


def test_passkey_accuracy_counts_exact_matches_only(monkeypatch):
  """A stub decoder answers right when the needle is at depth 0 and one digit wrong elsewhere."""
  tokenizer = data.ByteTokenizer()
  needle = re.compile(rb'^' + re.escape(PAPER_INTRO.encode()) + rb'\nThe pass key is (\d+)')

  def stub_decode(model, prompts_BxP, prompt_lengths_B, steps, query_chunk):
    rows = []
    for prompt, length in zip(prompts_BxP, prompt_lengths_B):
      text = bytes(np.asarray(prompt[:length], np.uint8))
      key = re.search(rb'The pass key is (\d+)\.', text).group(1)
      answer = b' ' + (key if needle.match(text) else key[:-1] + b'x')
      rows.append(list(answer) + [0] * (steps - len(answer)))
    return np.array(rows)

  monkeypatch.setattr(evaluate, 'greedy_decode', stub_decode)
  keys = evaluate.passkey_keys(4, 3, seed=0)
  assert keys.shape == (4, 3) and np.all((keys >= 10000) & (keys < 100000))
  result = evaluate.passkey(None, tokenizer, 800, keys, batch_size=5, query_chunk=64)
  assert result['by_depth'] == {'0': 1.0, '25': 0.0, '50': 0.0, '75': 0.0}
  assert result['accuracy'] == 0.25 and result['prompts'] == 12
  assert evaluate.passkey(None, tokenizer, 100, keys, 5, 64) is None


def test_greedy_decoding_with_the_cache_equals_greedy_with_full_forward_passes():
  cfg = small_config()
  m = model.Transformer(cfg, nnx.Rngs(3))
  for block in m.blocks:
    block.attention.temperature[...] = jnp.array([1.0, 1.5, 2.0, 1.2])
  prompts = np.asarray(jax.random.randint(jax.random.key(6), (2, 11), 0, 256))
  lengths = [7, 11]
  generated = evaluate.greedy_decode(m, prompts, lengths, steps=4, query_chunk=4)
  # Greedy by full forward passes over a fixed-width buffer: causal, so the padding after the
  # sequence changes no logit before it, and one compiled forward serves every step.
  full_forward = nnx.jit(lambda m, tokens: m(tokens))
  for row, length in enumerate(lengths):
    buffer = np.zeros((1, 15), np.int32)
    buffer[0, :length] = prompts[row, :length]
    for step in range(4):
      logits = full_forward(m, jnp.asarray(buffer))
      buffer[0, length + step] = int(jnp.argmax(logits[0, length + step - 1]))
    assert list(generated[row]) == list(buffer[0, length:length + 4])


# ---------------------------------------------------------------------------------------------
# End to end on a small trained workdir.

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
  cfg = small_config(tfds_dir)
  cfg.data.seq_len = 32
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
  assert 'temperature_entropy.png' in results['plots']
  assert os.path.isfile(tmp_path / 'eval' / 'temperature_entropy.png')


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
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)


def test_cli_errors_are_one_sentence_and_exit_2(tmp_path):
  unknown = _cli('--workdir', str(tmp_path), '--config.eval.lenghts=(16,)')
  assert unknown.returncode == 2
  assert unknown.stderr.strip().splitlines()[-1] == (
      'error: Unknown config key eval.lenghts; every key is declared in configs/base.py, check the spelling there.')
  not_a_run = _cli('--workdir', str(tmp_path / 'nothing'), '--config.eval.lengths=(16,64)')
  assert not_a_run.returncode == 2 and 'is not a nopejax workdir' in not_a_run.stderr.strip().splitlines()[-1]


def test_cli_compare_takes_the_directories_as_arguments(evaluated, tmp_path):
  workdir = evaluated[0]
  result = _cli('--compare', workdir, os.path.join(workdir, 'eval_c1.5'), '--out', str(tmp_path / 'cmp'))
  assert result.returncode == 0, result.stderr[-2000:]
  assert os.path.isfile(tmp_path / 'cmp' / 'compare.md') and os.path.isfile(tmp_path / 'cmp' / 'compare.png')
