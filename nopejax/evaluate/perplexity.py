"""Sliding-window perplexity by length (docs/method.md, section 5): every window one document's tokens,
each scoring its last `stride` tokens, so every scored token has at least length - stride of context."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


def window_starts(doc_len: int, length: int, stride: int) -> list[int]:
  """Offsets of a document's windows of `length` tokens: 0, stride, 2 stride, ... while one fits.

  A document shorter than `length` has none (it is skipped).
  """
  if doc_len < length:
    return []
  return list(range(0, doc_len - length + 1, stride))


def scored_indices(doc_len: int, length: int, stride: int) -> np.ndarray:
  """Document indices of the tokens the windows score: each window's last `stride` tokens.

  Consecutive windows score consecutive, disjoint runs, so every scored token has at least
  `length - stride` tokens of context; the first `length - stride` tokens of a document are
  context only, and fewer than `stride` tokens at its end may go unscored.
  """
  starts = window_starts(doc_len, length, stride)
  return np.array([i for s in starts for i in range(s + length - stride, s + length)], np.int64)


def nll_of_logits(logits_BxSxV, targets_BxS):
  """Next-token negative log-likelihood (nats) of each target: nll_BxS."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxSxV.astype(jnp.float32), targets_BxS)


def perplexity(documents, length: int, stride: int, max_tokens: int, batch_size: int, score_windows) -> dict:
  """Sliding-window perplexity at `length` (docs/method.md, section 5).

  documents: iterable of 1-D token arrays. score_windows(windows_BxN) -> nll_BxS: the NLL of each
  window's last S = `stride` tokens, each predicted from the window's tokens before it.
  At most W = max(1, max_tokens // stride) windows, spread over as many documents as possible:
  the first W documents at least `length` long (in file order), every one's first window, then
  every one's second window, and so on. The last batch is padded with copies of its first row,
  whose scores are dropped.

  Returns {'perplexity': exp(mean over windows of the window's mean NLL), 'nll': that mean,
  'windows', 'documents', 'tokens'}; perplexity and nll are None when no document is long enough.
  """
  max_windows = max(1, max_tokens // stride)
  eligible = []  # (document, its window starts)
  for doc in documents:
    starts = window_starts(len(doc), length, stride)
    if starts:
      eligible.append((doc, starts))
      if len(eligible) == max_windows:
        break
  windows = []  # (document index, start), round robin over the documents.
  for round_ in range(max((len(starts) for _, starts in eligible), default=0)):
    windows += [(d, starts[round_]) for d, (_, starts) in enumerate(eligible) if round_ < len(starts)]
    if len(windows) >= max_windows:
      break
  windows = windows[:max_windows]
  if not windows:
    return {'perplexity': None, 'nll': None, 'windows': 0, 'documents': 0, 'tokens': 0}
  scored = []  # (nll_BxS, rows that count): not read back yet, so the next batch is dispatched meanwhile.
  for first in range(0, len(windows), batch_size):
    batch = [np.asarray(eligible[d][0][start:start + length], np.int32)
             for d, start in windows[first:first + batch_size]]
    rows = np.stack(batch + [batch[0]] * (batch_size - len(batch)))
    scored.append((score_windows(rows), len(batch)))
  window_nlls = [w for nll_BxS, rows in scored for w in np.asarray(nll_BxS, np.float64)[:rows].mean(axis=1)]
  nll = float(np.mean(window_nlls))
  return {'perplexity': math.exp(nll), 'nll': nll, 'windows': len(windows),
          'documents': len({d for d, _ in windows}), 'tokens': len(windows) * stride}


# ---------------------------------------------------------------------------------------------
# Jitted model computations. The graphdef is a static argument, so models of the same structure
# share compiled code; each distinct window shape compiles once.


def _targets_nll(model, x_BxSxD, targets_BxS, chunk):
  """NLL of targets from hidden states, `chunk` positions at a time: logits never exceed B x chunk x V."""
  B, S, D = x_BxSxD.shape
  C = min(chunk, S)
  num_chunks = -(-S // C)
  pad = num_chunks * C - S
  x_NxBxCxD = jnp.pad(x_BxSxD, ((0, 0), (0, pad), (0, 0))).reshape(B, num_chunks, C, D).swapaxes(0, 1)
  targets_NxBxC = jnp.pad(targets_BxS, ((0, 0), (0, pad))).reshape(B, num_chunks, C).swapaxes(0, 1)
  nll_NxBxC = jax.lax.map(lambda xt: nll_of_logits(model.head(xt[0]), xt[1]), (x_NxBxCxD, targets_NxBxC))
  return nll_NxBxC.swapaxes(0, 1).reshape(B, num_chunks * C)[:, :S]


@functools.partial(jax.jit, static_argnames=('graphdef', 'scored', 'query_chunk'))
def _window_nll(graphdef, state, windows_BxN, scored, query_chunk):
  model = nnx.merge(graphdef, state)
  x_BxTxD, _ = model.forward_chunked(windows_BxN[:, :-1], query_chunk)
  return _targets_nll(model, x_BxTxD[:, -scored:], windows_BxN[:, -scored:], query_chunk)


def window_scorer(model, stride: int, query_chunk: int):
  """score_windows for `perplexity`: windows_BxN -> NLL of each window's last `stride` tokens.

  The model reads the window's first N - 1 tokens (its last token is only a target).
  """
  graphdef, state = nnx.split(model)
  return lambda windows_BxN: _window_nll(graphdef, state, jnp.asarray(windows_BxN), stride, query_chunk)
