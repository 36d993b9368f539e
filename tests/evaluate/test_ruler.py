"""ruler.py: the tasks' examples (deterministic, the requested length, holding their answer), the scoring,
and their place in evaluate's results, report and plot."""
import collections
import os
import re

import numpy as np
import pytest

from nopejax import data, evaluate, generate
from nopejax.evaluate import ruler


@pytest.fixture(scope='module')
def sentencepiece_tokenizer(tmp_path_factory):
  """A small SentencePiece model trained on the tasks' own text, so subword merges happen (bytes for unseen characters)."""
  sentencepiece = pytest.importorskip('sentencepiece')
  tmp = tmp_path_factory.mktemp('sp')
  text = [data.ByteTokenizer().decode(e['prompt_ids']) for task in ruler.TASKS
          for e in ruler.examples(task, data.ByteTokenizer(), 1500, 2, seed=9)]
  (tmp / 'corpus.txt').write_text('\n'.join(text))
  sentencepiece.SentencePieceTrainer.train(input=str(tmp / 'corpus.txt'), model_prefix=str(tmp / 'sp'),
                                           vocab_size=400, byte_fallback=True, minloglevel=2)
  return data.SentencePieceTokenizer(str(tmp / 'sp.model'))


@pytest.mark.parametrize('task', ruler.TASKS)
def test_examples_are_deterministic_and_depend_on_the_seed(task):
  tokenizer = data.ByteTokenizer()
  first, again = (ruler.examples(task, tokenizer, 1200, 3, seed=4) for _ in range(2))
  for a, b in zip(first, again):
    assert np.array_equal(a['prompt_ids'], b['prompt_ids']) and a['expected'] == b['expected']
  assert len({bytes(e['prompt_ids'].astype(np.uint8)) for e in first}) == 3
  other = ruler.examples(task, tokenizer, 1200, 1, seed=5)[0]
  assert not np.array_equal(other['prompt_ids'], first[0]['prompt_ids'])


@pytest.mark.parametrize('tokenizer_name', ['byte', 'sentencepiece'])
@pytest.mark.parametrize('task', ruler.TASKS)
def test_examples_fill_the_length_and_hold_their_answer(task, tokenizer_name, request):
  tokenizer = data.ByteTokenizer() if tokenizer_name == 'byte' else request.getfixturevalue('sentencepiece_tokenizer')
  for length in (1100, 4500):
    chosen = ruler.examples(task, tokenizer, length, 3, seed=0)
    tolerance = 100  # About one filler unit: a sentence of noise is 89 bytes.
    for example in chosen:
      total = len(example['prompt_ids']) + len(example['answer_ids'])
      assert total == example['tokens'] and length - tolerance < total <= length, (length, total)
      prompt = tokenizer.decode(example['prompt_ids'])
      answer = tokenizer.decode(example['answer_ids'])
      assert ruler.score(answer, example['expected']) == 1.0 and all(e in prompt for e in example['expected'])
      if task == 'niah_multikey':
        key = re.search(r'special magic number for (\S+) mentioned', prompt).group(1)
        assert re.findall(rf'numbers for {key} is: (\d+)', prompt) == example['expected']
        assert len(re.findall(r'numbers for \S+ is: \d+', prompt)) == ruler.NIAH_KEYS
      elif task == 'niah_multivalue':
        assert len(example['expected']) == ruler.NIAH_VALUES
      elif task == 'variable_tracking':
        value = re.search(r'assigned the value (\d+) in the text', prompt).group(1)
        names = example['expected']
        assert f'VAR {names[0]} = {value}' in prompt
        assert all(f'VAR {b} = VAR {a}' in prompt for a, b in zip(names, names[1:]))
      else:
        counts = collections.Counter(re.findall(r'\d+\. (\w+)', prompt.split('\nQuestion')[0]))
        repeats = 30 if length >= ruler.CWE_LONG else 6
        assert {counts[w] for w in example['expected']} == {repeats}
        assert max(c for w, c in counts.items() if w not in example['expected']) < repeats


def test_a_template_longer_than_the_length_gives_none():
  assert all(ruler.examples(task, data.ByteTokenizer(), 200, 2, seed=0) is None for task in ruler.TASKS)


def test_scoring_needs_every_expected_string():
  assert ruler.score(' 1234567, 2345678.', ['1234567', '2345678']) == 1.0
  assert ruler.score(' 1234567, 2345670', ['1234567', '2345678']) == 0.0
  assert ruler.score(' 1. Bafeki 2. mo', ['bafeki']) == 1.0 and ruler.score(' ', ['bafeki']) == 0.0


def test_accuracy_is_exact_per_task_with_a_decoder_that_knows_some_answers(monkeypatch):
  """A stub decoder gives the answer for niah_multikey and variable_tracking, and a wrong digit or word otherwise."""
  tokenizer = data.ByteTokenizer()
  answers = {}
  for task in ruler.TASKS:
    for example in ruler.examples(task, tokenizer, 1100, 3, seed=0):
      ids = example['answer_ids'].copy()
      if task in ('niah_multivalue', 'common_words'):
        ids[-1] = ord('x')
      answers[bytes(example['prompt_ids'].astype(np.uint8))] = ids

  def stub_decode(model, prompts_BxP, prompt_lengths_B, steps, query_chunk):
    rows = [answers[bytes(p[:n].astype(np.uint8))] for p, n in zip(prompts_BxP, prompt_lengths_B)]
    assert steps >= max(len(r) for r in rows) and steps & (steps - 1) == 0
    return np.array([np.pad(r, (0, steps - len(r))) for r in rows])

  monkeypatch.setattr(generate, 'greedy_decode', stub_decode)
  result = ruler.ruler(None, tokenizer, 1100, 3, batch_size=5, query_chunk=64, seed=0)
  assert {task: r['accuracy'] for task, r in result.items()} == {
      'niah_multikey': 1.0, 'niah_multivalue': 0.0, 'variable_tracking': 1.0, 'common_words': 0.0}
  assert all(r['prompts'] == 3 and 900 < r['prompt_tokens'] <= 1100 for r in result.values())
  assert ruler.ruler(None, tokenizer, 200, 3, 5, 64, 0) == {task: None for task in ruler.TASKS}


def test_evaluate_reports_every_task_by_length(small_run, tmp_path):
  results = evaluate.evaluate(small_run[1], {
      'eval.lengths': (64, 1024), 'eval.max_tokens': 16, 'eval.passkey_depths': 1, 'eval.passkey_keys': 2,
      'eval.entropy_documents': 0, 'eval.position_documents': 0}, out=str(tmp_path))
  assert list(results['ruler']) == list(ruler.TASKS)
  for task in ruler.TASKS:
    assert results['ruler'][task]['64'] is None and 0.0 <= results['ruler'][task]['1024'] <= 1.0
    assert results['ruler_detail'][task]['1024']['prompts'] == 2
  report = (tmp_path / 'report.md').read_text()
  assert '## RULER tasks (accuracy)' in report and '| task | 64 | 1024 |' in report
  assert all(re.search(rf'\| {task} \| n/a \| [0-9.]+ \|', report) for task in ruler.TASKS)
  assert 'ruler.png' in results['plots'] and os.path.isfile(tmp_path / 'ruler.png')
