"""Loss by token position and attention entropy by query position, averaged over documents; the
bands of the loss curve (0-L, L-2L, 2L-4L, ...) that docs/method.md, section 8 reads."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nopejax.evaluate.perplexity import _targets_nll


@functools.partial(jax.jit, static_argnames=('graphdef', 'query_chunk'))
def _position_stats(graphdef, state, windows_BxN1, entropy_weights_B, query_chunk):
  model = nnx.merge(graphdef, state)
  x_BxNxD, entropy_LxBxHxN = model.forward_chunked(windows_BxN1[:, :-1], query_chunk, with_entropy=True)
  nll_BxN = _targets_nll(model, x_BxNxD, windows_BxN1[:, 1:], query_chunk)
  return nll_BxN, jnp.einsum('lbhn,b->lhn', entropy_LxBxHxN, entropy_weights_B)


def position_stats(model, documents, length: int, position_documents: int, entropy_documents: int,
                   batch_size: int, query_chunk: int) -> dict:
  """Loss by token position and attention entropy over the first `length` + 1 tokens of documents.

  Uses the first max(position_documents, entropy_documents) documents that have `length` + 1
  tokens. Returns {'loss_by_position': [length] mean NLL of the token after query position i
  (0-based) over position_documents documents, 'entropy_LxHxN': [layers, heads, length] mean
  attention entropy (nats) of query position i over entropy_documents documents, and the
  two document counts}. Entries are empty (and counts 0) when no document is long enough.
  """
  graphdef, state = nnx.split(model)
  wanted = max(position_documents, entropy_documents)
  windows = []
  for doc in documents:
    if len(windows) == wanted:
      break
    if len(doc) >= length + 1:
      windows.append(np.asarray(doc[:length + 1], np.int32))
  position_count, entropy_count = min(position_documents, len(windows)), min(entropy_documents, len(windows))
  loss_sum_N = np.zeros(length)
  entropy_sum_LxHxN = None
  for first in range(0, len(windows), batch_size):
    rows = windows[first:first + batch_size]
    index_B = np.arange(first, first + batch_size)
    weights_B = (index_B < entropy_count).astype(np.float32)
    batch_BxN1 = np.stack(rows + [rows[0]] * (batch_size - len(rows)))
    nll_BxN, entropy_LxHxN = jax.device_get(_position_stats(graphdef, state, batch_BxN1, weights_B, query_chunk))
    loss_sum_N += np.asarray(nll_BxN, np.float64)[index_B < position_count].sum(axis=0)
    entropy_LxHxN = np.asarray(entropy_LxHxN, np.float64)
    entropy_sum_LxHxN = entropy_LxHxN if entropy_sum_LxHxN is None else entropy_sum_LxHxN + entropy_LxHxN
  return {
      'loss_by_position': (loss_sum_N / position_count).tolist() if position_count else [],
      'entropy_LxHxN': entropy_sum_LxHxN / entropy_count if entropy_count else np.zeros((0, 0, 0)),
      'position_documents': position_count,
      'entropy_documents': entropy_count,
  }


def band_means(values, pretrain_length) -> dict:
  """Mean of a per-position curve over 0-L, L-2L, 2L-4L, ... (docs/method.md, section 8)."""
  bands, low, high = {}, 0, pretrain_length
  while low < len(values):
    bands[f'{low}-{min(high, len(values))}'] = float(np.mean(values[low:high]))
    low, high = high, 2 * high
  return bands


def log_positions(n: int, count: int = 64) -> list[int]:
  """About `count` 1-based positions from 1 to n, spaced evenly in log scale, n included."""
  return sorted({int(round(p)) for p in np.geomspace(1, n, count)} | {n}) if n else []
