import jax.numpy as jnp
import numpy as np

from nopejax.evaluate import perplexity


def test_windows_score_each_windows_last_stride_tokens():
  # Length 10, windows of 4, stride 2: windows start at 0, 2, 4, 6 and score tokens 2-3, 4-5, 6-7, 8-9.
  assert perplexity.window_starts(10, 4, 2) == [0, 2, 4, 6]
  np.testing.assert_array_equal(perplexity.scored_indices(10, 4, 2), [2, 3, 4, 5, 6, 7, 8, 9])
  # One more token does not make another window: token 10 stays unscored.
  assert perplexity.window_starts(11, 4, 2) == [0, 2, 4, 6]
  np.testing.assert_array_equal(perplexity.scored_indices(11, 4, 2), [2, 3, 4, 5, 6, 7, 8, 9])
  np.testing.assert_array_equal(perplexity.scored_indices(4, 4, 3), [1, 2, 3])
  np.testing.assert_array_equal(perplexity.scored_indices(12, 8, 1), [7, 8, 9, 10, 11])


def test_documents_shorter_than_the_window_are_skipped():
  assert perplexity.window_starts(3, 4, 2) == []
  calls = []
  result = perplexity.perplexity([np.arange(3), np.arange(2)], 4, 2, 100, 2, calls.append)
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
    return perplexity.nll_of_logits(jnp.asarray(table)[windows_BxN[:, -3:-1]], windows_BxN[:, -2:])

  result = perplexity.perplexity([short, doc_a, doc_b], 4, 2, 100, 3, score_windows)
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
  capped = perplexity.perplexity([short, doc_a, doc_b], 4, 2, 4, 3, score_windows)
  assert capped['windows'] == 2 and capped['documents'] == 2
  np.testing.assert_allclose(capped['nll'], np.mean(window_nll[:2]), rtol=1e-6)
