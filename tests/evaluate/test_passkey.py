"""passkey.py: the paper's prompt, examples that fill a length, exact-match accuracy (the cached greedy
decoding it calls is tested in tests/test_generate.py)."""
import re

import numpy as np

from nopejax import data
from nopejax.evaluate import passkey

# docs/method.md, section 5, copied by hand: the test fails if the code's template drifts from the paper's.
PAPER_INTRO = ('There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. '
               'I will quiz you about the important information there.\n')
PAPER_GARBAGE = ' The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.'



def test_passkey_prompt_matches_the_papers_template_byte_for_byte():
  expected = (PAPER_INTRO + PAPER_GARBAGE * 2
              + '\nThe pass key is 40123. Remember it. 40123 is the pass key.\n'
              + PAPER_GARBAGE * 1 + '\nWhat is the pass key? The pass key is')
  assert passkey.passkey_prompt(40123, 2, 1).encode('utf-8') == expected.encode('utf-8')


def test_passkey_example_fills_the_length_and_places_the_needle_at_its_depth():
  tokenizer = data.ByteTokenizer()
  garbage = len(PAPER_GARBAGE)
  for depth in (0.0, 0.5, 0.9):
    prompt, answer = passkey.passkey_example(tokenizer, 12345, depth, 2000)
    assert bytes(answer.astype(np.uint8)) == b' 12345'
    assert 2000 - garbage < len(prompt) + len(answer) <= 2000
    text = bytes(prompt.astype(np.uint8)).decode()
    total = text.count(PAPER_GARBAGE)
    before = text[:text.index('\nThe pass key is 12345.')].count(PAPER_GARBAGE)
    assert before == int(total * depth)
  assert passkey.passkey_example(tokenizer, 12345, 0.5, 200) is None  # The bare template is ~250 bytes.


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

  monkeypatch.setattr(passkey, 'greedy_decode', stub_decode)
  keys = passkey.passkey_keys(4, 3, seed=0)
  assert keys.shape == (4, 3) and np.all((keys >= 10000) & (keys < 100000))
  result = passkey.passkey(None, tokenizer, 800, keys, batch_size=5, query_chunk=64)
  assert result['by_depth'] == {'0': 1.0, '25': 0.0, '50': 0.0, '75': 0.0}
  assert result['accuracy'] == 0.25 and result['prompts'] == 12
  assert passkey.passkey(None, tokenizer, 100, keys, 5, 64) is None
