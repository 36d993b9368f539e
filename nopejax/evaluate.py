"""Length generalization of a trained run: perplexity by length, loss by position, attention
entropy, passkey retrieval; results.json, PNG plots and report.md (protocol and schema: docs/evaluate.md).

  python -m nopejax.evaluate --workdir runs/tiny                                  # -> runs/tiny/eval/
  python -m nopejax.evaluate --workdir runs/tiny --config.model.temperature=1.5   # -> runs/tiny/eval_c1.5/
  python -m nopejax.evaluate --workdir runs/tiny --config.eval.lengths='(64,256)' --config.data.dataset=textdir \
      --config.data.text_dir=/data/pg19
  python -m nopejax.evaluate --compare runs/tiny runs/tiny/eval_c1.5 runs/tiny_search --out runs/compare

Every window is one document's tokens and attention runs a query chunk at a time
(model.forward_chunked), so memory grows linearly with the evaluated length, never with its square.
The computing functions take a model (or a scoring callable) and plain arrays, so a notebook can
call them; `evaluate` and `compare` are what the command line runs.
"""
import functools
import json
import logging as logging_std
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import nnx

import nopejax
from nopejax import checkpoint, config, data, paths
from nopejax import model as model_lib
from nopejax.config import ConfigError

# The paper's passkey prompt (method.md, section 5), byte for byte.
PASSKEY_INTRO = ('There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. '
                 'I will quiz you about the important information there.\n')
PASSKEY_GARBAGE = ' The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.'
PASSKEY_NEEDLE = '\nThe pass key is {key}. Remember it. {key} is the pass key.\n'
PASSKEY_QUESTION = '\nWhat is the pass key? The pass key is'

# Keys an evaluation may override; the rest describe the trained model and come from its workdir.
# The position keys are the zero-shot extensions (RoPE scalings, log-n): they change no parameter.
POSITION_OVERRIDES = ('model.rope_scaling', 'model.rope_scaling_factor', 'model.original_length',
                      'model.yarn_beta_fast', 'model.yarn_beta_slow', 'model.llama3_low_freq_factor',
                      'model.llama3_high_freq_factor', 'model.logn')
_OVERRIDABLE = ('model.temperature', 'data.dataset', 'data.text_dir', 'data.text_key', 'data.tfds_dir',
                'data.tokenizer') + POSITION_OVERRIDES


# ---------------------------------------------------------------------------------------------
# Perplexity by length: sliding windows over whole documents.


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
  """Sliding-window perplexity at `length` (method.md, section 5).

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


@functools.partial(jax.jit, static_argnames=('graphdef', 'steps', 'query_chunk'))
def _greedy(graphdef, state, prompts_BxP, prompt_lengths_B, steps, query_chunk):
  model = nnx.merge(graphdef, state)
  B, P = prompts_BxP.shape
  x_BxPxD, cache = model.prefill(prompts_BxP, P + steps, query_chunk)
  x_Bx1xD = x_BxPxD[jnp.arange(B), prompt_lengths_B - 1][:, None]
  first_B = jnp.argmax(model.head(x_Bx1xD)[:, 0], axis=-1).astype(jnp.int32)

  def step(carry, _):
    token_B, cache, index_B = carry
    logits_BxV, cache = model.decode(token_B, cache, index_B)
    return (jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32), cache, index_B + 1), token_B

  (last_B, _, _), tokens_SxB = jax.lax.scan(step, (first_B, cache, prompt_lengths_B), None, length=steps - 1)
  return jnp.concatenate([tokens_SxB.T, last_B[:, None]], axis=1)


def greedy_decode(model, prompts_BxP, prompt_lengths_B, steps: int, query_chunk: int) -> np.ndarray:
  """Greedy continuation of right-padded prompts with a KV cache: tokens_BxSteps (int32).

  Row b's prompt is prompts_BxP[b, :prompt_lengths_B[b]]; the padding after it is never attended.
  One prefill over the prompts, then `steps - 1` single-token decoding steps.
  """
  graphdef, state = nnx.split(model)
  return np.asarray(_greedy(graphdef, state, jnp.asarray(prompts_BxP, jnp.int32),
                            jnp.asarray(prompt_lengths_B, jnp.int32), steps, query_chunk))


# ---------------------------------------------------------------------------------------------
# Passkey retrieval.


def passkey_prompt(key: int, garbage_before: int, garbage_after: int) -> str:
  """The paper's prompt with the needle after `garbage_before` of the garbage sentences."""
  return (PASSKEY_INTRO + PASSKEY_GARBAGE * garbage_before + PASSKEY_NEEDLE.format(key=key)
          + PASSKEY_GARBAGE * garbage_after + PASSKEY_QUESTION)


def passkey_answer(tokenizer, prompt: str, key: int) -> np.ndarray:
  """The ids the model must generate: those that ' {key}' adds after the prompt.

  Bytes: ' 12345' (6 ids). A SentencePiece tokenizer that splits digits (Llama's) gives the word
  marker then the digits, as the reference implementation's tokenizer(str(key)) without BOS does.
  Falls back to encode(str(key)) when the prompt's ids are not a prefix of the longer text's.
  """
  prompt_ids, full_ids = tokenizer.encode(prompt), tokenizer.encode(f'{prompt} {key}')
  if len(full_ids) > len(prompt_ids) and np.array_equal(full_ids[:len(prompt_ids)], prompt_ids):
    return np.asarray(full_ids[len(prompt_ids):], np.int32)
  return np.asarray(tokenizer.encode(str(key)), np.int32)


def passkey_example(tokenizer, key: int, depth: float, length: int):
  """(prompt_ids, answer_ids) whose total is at most `length` tokens, or None if the bare template doesn't fit.

  As many garbage sentences as fit; the needle sits after a fraction `depth` of them.
  """
  answer = passkey_answer(tokenizer, passkey_prompt(key, 0, 0), key)
  fixed = len(data.encode_document(tokenizer, passkey_prompt(key, 0, 0)))
  per_garbage = max(1, len(tokenizer.encode(PASSKEY_GARBAGE)))
  total = max(0, (length - len(answer) - fixed) // per_garbage)
  while True:
    before = int(total * depth)
    prompt = passkey_prompt(key, before, total - before)
    ids = data.encode_document(tokenizer, prompt)
    answer = passkey_answer(tokenizer, prompt, key)
    if len(ids) + len(answer) <= length:
      return ids, answer
    if total == 0:
      return None
    total -= 1  # Subword merges can make the estimate a sentence too long.


def passkey_keys(depths: int, keys: int, seed: int) -> np.ndarray:
  """[depths, keys] random 5-digit keys, the same at every length."""
  return np.random.default_rng(seed).integers(10000, 100000, size=(depths, keys))


def passkey(model, tokenizer, length: int, keys_DxK, batch_size: int, query_chunk: int) -> dict | None:
  """Passkey accuracy at `length`: depths i / D for i < D, keys_DxK[i] at depth i.

  Greedy decoding of as many tokens as the answer has; a prompt is correct iff the generated ids
  equal the answer's ids exactly. Returns {'accuracy', 'by_depth': {percent: accuracy},
  'prompts', 'prompt_tokens'} or None when the template does not fit in `length` tokens.
  """
  num_depths = keys_DxK.shape[0]
  examples = []
  for d in range(num_depths):
    for key in keys_DxK[d]:
      example = passkey_example(tokenizer, int(key), d / num_depths, length)
      if example is None:
        return None
      examples.append((d, *example))
  width = max(len(prompt) for _, prompt, _ in examples)
  steps = max(len(answer) for _, _, answer in examples)
  correct = []
  for first in range(0, len(examples), batch_size):
    rows = examples[first:first + batch_size]
    rows = rows + [rows[0]] * (batch_size - len(rows))
    prompts_BxP = np.zeros((batch_size, width), np.int32)
    for b, (_, prompt, _) in enumerate(rows):
      prompts_BxP[b, :len(prompt)] = prompt
    generated_BxS = greedy_decode(model, prompts_BxP, [len(p) for _, p, _ in rows], steps, query_chunk)
    for b, (_, _, answer) in enumerate(rows[:min(batch_size, len(examples) - first)]):
      correct.append(bool(np.array_equal(generated_BxS[b, :len(answer)], answer)))
  correct_DxK = np.array(correct).reshape(keys_DxK.shape)
  return {
      'accuracy': float(correct_DxK.mean()),
      'by_depth': {str(round(100 * d / num_depths)): float(correct_DxK[d].mean()) for d in range(num_depths)},
      'prompts': len(examples),
      'prompt_tokens': float(np.mean([len(prompt) for _, prompt, _ in examples])),
  }


# ---------------------------------------------------------------------------------------------
# A whole evaluation of a workdir.


class _CachedDocuments:
  """Tokenized documents of a split, read once and iterable many times (one per length)."""

  def __init__(self, source):
    self.source, self.cache = source, []

  def __iter__(self):
    yield from self.cache
    for i in range(len(self.cache), len(self.source)):
      self.cache.append(np.asarray(self.source[i], np.int32))
      yield self.cache[-1]


def _run_info(workdir, cfg) -> dict:
  """Kind, step, pretraining length (from the base run for a search) and search length of a workdir."""
  step = checkpoint.latest_step(workdir)
  meta = checkpoint.read_meta(workdir, step)
  info = {'kind': meta['kind'], 'step': step, 'pretrain_length': cfg.data.seq_len, 'search_length': None}
  if meta['kind'] == 'search':
    base_dir = (meta.get('base') or {}).get('workdir') or cfg.search.base
    base_config = paths.resolve(base_dir) / 'config.json'
    if not base_config.exists():
      raise ConfigError(f'The search run {workdir} points to base run {base_dir}, which has no config.json; '
                        'restore that directory so the pretraining length is known.')
    info['pretrain_length'] = config.load_json(base_config).data.seq_len
    info['search_length'] = cfg.data.seq_len
    info['base_workdir'] = base_dir
  return info


def eval_lengths(cfg, pretrain_length: int) -> tuple[list[int], int]:
  """(window lengths, stride) from cfg.eval, defaults resolved against the pretraining length; checked."""
  e = cfg.eval
  if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in e.lengths):
    raise ConfigError(f'eval.lengths={e.lengths!r} must hold positive integers; '
                      "set e.g. --config.eval.lengths='(2048,8192)', or () for 1 to 16 x the pretraining length.")
  lengths = list(e.lengths) or [k * pretrain_length for k in (1, 2, 4, 8, 16)]
  stride = e.stride or max(1, min(256, pretrain_length // 4))
  if stride <= 0:
    raise ConfigError(f'eval.stride={e.stride} must be positive (or 0 for the default); '
                      'set e.g. --config.eval.stride=256.')
  too_short = [n for n in lengths if n <= stride]
  if too_short:
    raise ConfigError(f'eval.lengths has {too_short[0]}, not longer than the stride {stride}; '
                      'use longer lengths or a smaller --config.eval.stride.')
  for key in ('max_tokens', 'batch_size', 'query_chunk'):
    if e[key] <= 0:
      raise ConfigError(f'eval.{key}={e[key]} must be positive; set --config.eval.{key} to a positive integer.')
  for key in ('passkey_depths', 'passkey_keys', 'entropy_documents', 'position_documents'):
    if e[key] < 0:
      raise ConfigError(f'eval.{key}={e[key]} must not be negative; set --config.eval.{key}=0 to skip it.')
  if e.split not in data.SPLITS:
    raise ConfigError(f'eval.split={e.split!r} is not one of {data.SPLITS}; pick one of those.')
  return sorted(set(lengths)), stride


def check_overrides(overrides: dict) -> None:
  """Only the temperature, the corpus and eval.* may differ from the trained run's config."""
  for key in overrides:
    if not config.is_declared(key):
      raise ConfigError(
          f'Unknown config key {key}; every key is declared in configs/base.py, check the spelling there.')
    if not (key.startswith('eval.') or key in _OVERRIDABLE):
      raise ConfigError(f'{key} describes the trained run and cannot change at evaluation; '
                        f'only eval.*, {", ".join(_OVERRIDABLE)} can be overridden.')
  temperature = overrides.get('model.temperature')
  if temperature is not None and not temperature > 0:
    raise ConfigError(f'model.temperature={temperature} must be positive (it multiplies every query); '
                      'set a value like 1.5.')


def _set_key(cfg, dotted, value):
  *parents, leaf = dotted.split('.')
  node = cfg
  for name in parents:
    node = node[name]
  node[leaf] = tuple(value) if isinstance(node[leaf], tuple) else value


def _position_suffix(position_overrides) -> str:
  """'_rope_scaling=yarn_logn=True' for position overrides, '' for none."""
  return ''.join(f'_{key.split(".")[-1]}={value:g}' if isinstance(value, float) else f'_{key.split(".")[-1]}={value}'
                 for key, value in sorted(position_overrides.items()))


def default_out_dir(workdir, temperature=None, position_overrides=None) -> epath.Path:
  """WORKDIR/eval, WORKDIR/eval_c1.5 for a uniform temperature override of 1.5, and the position
  overrides appended (WORKDIR/eval_rope_scaling=yarn)."""
  name = 'eval' if temperature is None else f'eval_c{temperature:g}'
  return paths.resolve(workdir) / (name + _position_suffix(position_overrides or {}))


def with_position_overrides(model, cfg):
  """The model rebuilt for cfg's position settings (RoPE scaling, log-n) with the same parameters."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: model_lib.Transformer(cfg, nnx.Rngs(0))))
  return nnx.merge(graphdef, nnx.state(model))


def _band_means(values, pretrain_length) -> dict:
  """Mean of a per-position curve over 0-L, L-2L, 2L-4L, ... (method.md, section 8)."""
  bands, low, high = {}, 0, pretrain_length
  while low < len(values):
    bands[f'{low}-{min(high, len(values))}'] = float(np.mean(values[low:high]))
    low, high = high, 2 * high
  return bands


def _log_positions(n: int, count: int = 64) -> list[int]:
  """About `count` 1-based positions from 1 to n, spaced evenly in log scale, n included."""
  return sorted({int(round(p)) for p in np.geomspace(1, n, count)} | {n}) if n else []


def evaluate(workdir, overrides=None, out=None) -> dict:
  """Evaluates the latest checkpoint of `workdir` and writes results.json, plots and report.md.

  overrides: {'eval.lengths': (64, 256), 'model.temperature': 1.5, ...}; a temperature sets
  every head to that value. out: the output directory (default `default_out_dir`). Returns the
  results dict. Raises ConfigError for anything the user must fix, before writing anything.
  """
  overrides = dict(overrides or {})
  check_overrides(overrides)
  temperature = overrides.pop('model.temperature', None)
  position_overrides = {key: value for key, value in overrides.items() if key in POSITION_OVERRIDES}
  model, cfg = nopejax.load(workdir, temperature)
  for key, value in overrides.items():
    _set_key(cfg, key, value)
  if position_overrides:
    config.validate(cfg)
    model = with_position_overrides(model, cfg)
  info = _run_info(workdir, cfg)
  lengths, stride = eval_lengths(cfg, info['pretrain_length'])
  e = cfg.eval
  tokenizer = data.make_tokenizer(cfg)
  documents = _CachedDocuments(data.documents(cfg, e.split))
  out = paths.resolve(out) if out else default_out_dir(workdir, temperature, position_overrides)
  label = (paths.resolve(workdir).name + ('' if temperature is None else f' c={temperature:g}')
           + _position_suffix(position_overrides).replace('_', ' ', 1))
  logging.info('Evaluating %s (%s, step %d) at lengths %s, stride %d -> %s', workdir, info['kind'], info['step'],
               lengths, stride, out)

  results = {
      'label': label, 'workdir': str(paths.resolve(workdir)), **info, 'temperature_override': temperature,
      'temperatures': np.asarray(jax.device_get(
          [block.attention.temperature[...] for block in model.blocks]), np.float64).tolist(),
      'dataset': cfg.data.dataset, 'split': e.split, 'lengths': lengths, 'stride': stride,
      'perplexity': {}, 'perplexity_detail': {}, 'passkey': {}, 'passkey_detail': {},
  }
  score_windows = window_scorer(model, stride, e.query_chunk)
  for n in lengths:
    detail = perplexity(documents, n, stride, e.max_tokens, e.batch_size, score_windows)
    results['perplexity'][str(n)] = detail.pop('perplexity')
    results['perplexity_detail'][str(n)] = detail
    logging.info('length %d: perplexity %s over %d windows of %d documents', n, results['perplexity'][str(n)],
                 detail['windows'], detail['documents'])

  if e.passkey_keys and e.passkey_depths:
    keys_DxK = passkey_keys(e.passkey_depths, e.passkey_keys, e.seed)
    for n in lengths:
      detail = passkey(model, tokenizer, n, keys_DxK, e.batch_size, e.query_chunk)
      results['passkey'][str(n)] = None if detail is None else detail.pop('accuracy')
      results['passkey_detail'][str(n)] = detail
      logging.info('length %d: passkey accuracy %s', n, results['passkey'][str(n)])

  longest = max(lengths)
  stats = position_stats(model, documents, longest, e.position_documents, e.entropy_documents,
                         e.batch_size, e.query_chunk)
  entropy_LxHxN = stats['entropy_LxHxN']
  results.update(
      loss_by_position=stats['loss_by_position'],
      loss_by_band=_band_means(stats['loss_by_position'], info['pretrain_length']),
      position_documents=stats['position_documents'],
      entropy_documents=stats['entropy_documents'])
  if entropy_LxHxN.size:
    mean_N = entropy_LxHxN.mean(axis=(0, 1))
    positions = _log_positions(longest)
    results['entropy_mean'] = {str(i + 1): float(v) for i, v in enumerate(mean_N)}
    results['entropy_by_layer'] = {
        'positions': positions,
        'values': entropy_LxHxN.mean(axis=1)[:, np.array(positions) - 1].tolist()}
    results['entropy_last'] = entropy_LxHxN[:, :, -1].tolist()
  else:
    logging.warning('No %s document has %d tokens: no loss-by-position or entropy curves.', e.split, longest + 1)
    results.update(entropy_mean={}, entropy_by_layer={'positions': [], 'values': []}, entropy_last=[])
  results['config'] = cfg.to_dict()

  if jax.process_index() == 0:
    out.mkdir(parents=True, exist_ok=True)
    with (out / 'entropy.npz').open('wb') as f:
      np.savez_compressed(f, entropy_LxHxN=entropy_LxHxN.astype(np.float32),
                          loss_by_position=np.asarray(stats['loss_by_position'], np.float32))
    results['plots'] = write_plots(results, entropy_LxHxN, out)
    (out / 'results.json').write_text(json.dumps(results, indent=1))
    write_report(results, out)
  return results


# ---------------------------------------------------------------------------------------------
# Plots and the report.


def _pyplot():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def smooth(values, window: int) -> np.ndarray:
  """Centered moving average over `window` positions, shrinking at the ends (no padding bias)."""
  values = np.asarray(values, np.float64)
  if window <= 1 or len(values) == 0:
    return values
  sums = np.concatenate([[0.0], np.cumsum(values)])
  index = np.arange(len(values))
  low = np.maximum(0, index - window // 2)
  high = np.minimum(len(values), index + window - window // 2)
  return (sums[high] - sums[low]) / (high - low)


def smoothing_window(n: int) -> int:
  """The moving-average width of the position plots: 2% of the curve."""
  return max(1, n // 50)


def _length_axes(ax, lengths, values):
  """Log-2 x axis ticked at the lengths; log y only when the values span more than 10x."""
  ax.set_xscale('log', base=2)
  ax.set_xticks(lengths, [str(n) for n in lengths])
  ax.minorticks_off()
  finite = [v for v in values if v is not None and np.isfinite(v)]
  if finite and max(finite) > 10 * min(finite):
    ax.set_yscale('log')


def _mark_lengths(ax, results, vertical=True):
  for key, style in (('pretrain_length', '--'), ('search_length', ':')):
    if results.get(key):
      (ax.axvline if vertical else ax.axhline)(results[key], color='gray', linestyle=style, linewidth=1,
                                               label=key.replace('_', ' '))


def _save_png(fig, path) -> None:
  with epath.Path(path).open('wb') as f:
    fig.savefig(f, format='png', dpi=110)


def write_plots(results, entropy_LxHxN, out) -> list[str]:
  """The PNG files of one evaluation, written into `out` (a path or URL); returns their names."""
  plt = _pyplot()
  written = []

  def save(fig, name):
    _save_png(fig, epath.Path(out) / name)
    plt.close(fig)
    written.append(name)

  lengths = results['lengths']
  ppl = [results['perplexity'][str(n)] for n in lengths]
  fig, ax = plt.subplots(figsize=(5.5, 3.8), constrained_layout=True)
  ax.plot(lengths, [np.nan if p is None else p for p in ppl], 'o-')
  _length_axes(ax, lengths, ppl)
  ax.set(xlabel='window length n (tokens)', ylabel='perplexity',
         title=f'Sliding-window perplexity (stride {results["stride"]})')
  _mark_lengths(ax, results)
  ax.legend(fontsize=8)
  save(fig, 'perplexity.png')

  loss = results['loss_by_position']
  if loss:
    window = smoothing_window(len(loss))
    fig, ax = plt.subplots(figsize=(6.5, 3.8), constrained_layout=True)
    ax.plot(np.arange(1, len(loss) + 1), smooth(loss, window))
    ax.set(xlabel='token position (context length)', ylabel='next-token loss (nats)',
           title=f'Loss by position, {results["position_documents"]} documents, moving average {window}')
    _mark_lengths(ax, results)
    ax.legend(fontsize=8)
    save(fig, 'loss_by_position.png')

  if entropy_LxHxN.size:
    L, H, N = entropy_LxHxN.shape
    positions = np.arange(1, N + 1)
    fig, (ax, ax_layers) = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
    ax.plot(positions, entropy_LxHxN.mean(axis=(0, 1)), label='mean over layers and heads')
    ax.plot(positions, np.log(positions), 'k--', linewidth=1, label='ln i (uniform attention)')
    _mark_lengths(ax, results)
    ax.set(xlabel='query position i', ylabel='attention entropy (nats)',
           title=f'Attention entropy, {results["entropy_documents"]} documents')
    ax.legend(fontsize=8)
    colors = plt.cm.viridis(np.linspace(0, 1, L))
    for layer in range(L):
      ax_layers.plot(positions, entropy_LxHxN[layer].mean(axis=0), color=colors[layer], label=f'layer {layer}')
    ax_layers.plot(positions, np.log(positions), 'k--', linewidth=1)
    ax_layers.set(xlabel='query position i', ylabel='entropy (nats), mean over heads', title='By layer')
    if L <= 12:
      ax_layers.legend(fontsize=7)
    save(fig, 'entropy.png')

    fig, ax = plt.subplots(figsize=(max(4.5, 1.5 + 0.4 * H), max(3.0, 1.2 + 0.35 * L)), constrained_layout=True)
    image = ax.imshow(entropy_LxHxN[:, :, -1], cmap='magma', aspect='auto')
    ax.set(xlabel='head', ylabel='layer',
           title=f'Entropy at the last position {N}\n(upper bound ln {N} = {math.log(N):.2f})')
    fig.colorbar(image, ax=ax, label='nats')
    save(fig, 'entropy_heatmap.png')

    if results['kind'] == 'search':
      columns = min(L, 6)
      rows = -(-L // columns)
      fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.4 * rows), squeeze=False,
                               constrained_layout=True)
      temperatures = np.asarray(results['temperatures'])
      for layer, ax in enumerate(axes.flat):
        if layer >= L:
          ax.axis('off')
          continue
        ax.scatter(entropy_LxHxN[layer, :, -1], temperatures[layer], s=14)
        ax.set_title(f'layer {layer}', fontsize=9)
        ax.set_xlabel('entropy at last position', fontsize=8)
        ax.set_ylabel('temperature c_h', fontsize=8)
      fig.suptitle('Searched temperature against attention entropy, per head')
      save(fig, 'temperature_entropy.png')

  detail = {n: d for n, d in results['passkey_detail'].items() if d}
  if detail:
    depths = list(next(iter(detail.values()))['by_depth'])
    grid = np.array([[results['passkey_detail'][str(n)]['by_depth'][d] if results['passkey_detail'][str(n)]
                      else np.nan for n in lengths] for d in depths])
    fig, ax = plt.subplots(figsize=(1.5 + 0.8 * len(lengths), 1.2 + 0.3 * len(depths)), constrained_layout=True)
    image = ax.imshow(grid, cmap='RdYlGn', vmin=0, vmax=1, aspect='auto')
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f'{d}%' for d in depths])
    for column, n in enumerate(lengths):
      if not results['passkey_detail'][str(n)]:
        ax.text(column, (len(depths) - 1) / 2, 'prompt\ndoes not\nfit', ha='center', va='center', fontsize=8)
    ax.set(xlabel='length (tokens)', ylabel='needle depth', title='Passkey retrieval accuracy')
    fig.colorbar(image, ax=ax)
    save(fig, 'passkey.png')
  return written


def _number(value, digits=3):
  return 'n/a' if value is None else f'{value:.{digits}f}'


def write_report(results, out) -> None:
  """report.md: what was evaluated, the tables, and every plot embedded."""
  lengths = [str(n) for n in results['lengths']]
  lines = [f'# Evaluation of {results["label"]}', '',
           f'- workdir: `{results["workdir"]}` ({results["kind"]}, step {results["step"]})',
           f'- pretraining length: {results["pretrain_length"]}'
           + (f'; searched at length {results["search_length"]}' if results['search_length'] else ''),
           '- temperature: ' + (f'uniform c = {results["temperature_override"]:g} (override)'
                                 if results['temperature_override'] is not None else 'as trained'),
           f'- data: {results["dataset"]} split `{results["split"]}`; sliding windows with stride {results["stride"]}',
           '', '## Perplexity by length', '',
           '| | ' + ' | '.join(lengths) + ' |', '|---|' + '---|' * len(lengths),
           '| perplexity | ' + ' | '.join(_number(results['perplexity'][n]) for n in lengths) + ' |',
           '| windows | ' + ' | '.join(str(results['perplexity_detail'][n]['windows']) for n in lengths) + ' |', '']
  if results['passkey']:
    lines += ['## Passkey retrieval', '', '| | ' + ' | '.join(lengths) + ' |', '|---|' + '---|' * len(lengths),
              '| accuracy | ' + ' | '.join(_number(results['passkey'].get(n), 2) for n in lengths) + ' |', '',
              'n/a: the prompt template alone is longer than the length.', '']
  if results['loss_by_band']:
    bands = list(results['loss_by_band'])
    lines += ['## Loss by position band (nats)', '', '| ' + ' | '.join(bands) + ' |', '|' + '---|' * len(bands),
              '| ' + ' | '.join(_number(results['loss_by_band'][b]) for b in bands) + ' |', '']
  captions = {
      'perplexity.png': 'Sliding-window perplexity by window length.',
      'loss_by_position.png': 'Next-token loss by position, averaged over documents.',
      'entropy.png': 'Attention entropy by query position with its upper bound ln i; right: per layer.',
      'entropy_heatmap.png': 'Entropy of each layer and head at the last position.',
      'temperature_entropy.png': 'Each head\'s searched temperature against its entropy at the last position.',
      'passkey.png': 'Passkey accuracy by needle depth and length.',
  }
  lines += ['## Plots', '']
  for name in results.get('plots', []):
    lines += [f'![{name}]({name})', '', captions.get(name, ''), '']
  (epath.Path(out) / 'report.md').write_text('\n'.join(lines))


# ---------------------------------------------------------------------------------------------
# Comparing evaluated runs.


def read_results(path) -> dict:
  """results.json from its path, an eval directory, or a workdir (its eval/)."""
  path = paths.resolve(path)
  for candidate in (path, path / 'results.json', path / 'eval' / 'results.json'):
    if candidate.is_file():
      return json.loads(candidate.read_text())
  raise ConfigError(f'{path} holds no results.json (nor eval/results.json); run '
                    f'`python -m nopejax.evaluate --workdir {path}` first.')


def compare(run_dirs, out) -> dict:
  """Overlays perplexity by length and loss by position of evaluated runs: compare.png, compare.md.

  Returns {'runs': labels, 'perplexity': {label: {length: ppl}}, 'passkey': ...}, also written
  as compare.json.
  """
  if not run_dirs:
    raise ConfigError('--compare needs at least one evaluated run; pass their directories after it.')
  runs = [read_results(p) for p in run_dirs]
  labels = []
  for run in runs:
    label = run['label']
    labels.append(label if label not in labels else f'{label} ({len(labels)})')
  lengths = sorted({int(n) for run in runs for n in run['perplexity']})

  plt = _pyplot()
  fig, (ax_ppl, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
  for label, run in zip(labels, runs):
    run_lengths = sorted(int(n) for n in run['perplexity'])
    ax_ppl.plot(run_lengths, [run['perplexity'][str(n)] or np.nan for n in run_lengths], 'o-', label=label)
    loss = run['loss_by_position']
    if loss:
      ax_loss.plot(np.arange(1, len(loss) + 1), smooth(loss, smoothing_window(len(loss))), label=label)
  pretrain_lengths = sorted({run['pretrain_length'] for run in runs})
  for length in pretrain_lengths:
    for ax in (ax_ppl, ax_loss):
      ax.axvline(length, color='gray', linestyle='--', linewidth=1)
  _length_axes(ax_ppl, lengths, [p for run in runs for p in run['perplexity'].values()])
  ax_ppl.set(xlabel='window length n (tokens)', ylabel='perplexity', title='Sliding-window perplexity')
  ax_loss.set(xlabel='token position', ylabel='next-token loss (nats)', title='Loss by position (moving average 2%)')
  ax_ppl.legend(fontsize=8)
  ax_loss.legend(fontsize=8)
  out = paths.resolve(out)
  out.mkdir(parents=True, exist_ok=True)
  _save_png(fig, out / 'compare.png')
  plt.close(fig)

  header = ['| run | ' + ' | '.join(str(n) for n in lengths) + ' |', '|---|' + '---|' * len(lengths)]
  lines = ['# Comparison', '', f'Pretraining length(s): {", ".join(map(str, pretrain_lengths))}.', '',
           '## Sliding-window perplexity', ''] + header
  for label, run in zip(labels, runs):
    lines.append(f'| {label} | ' + ' | '.join(_number(run['perplexity'].get(str(n)), 2) for n in lengths) + ' |')
  lines += ['', '## Passkey accuracy', ''] + header
  for label, run in zip(labels, runs):
    lines.append(f'| {label} | ' + ' | '.join(_number(run['passkey'].get(str(n)), 2) for n in lengths) + ' |')
  bands = list(dict.fromkeys(b for run in runs for b in run.get('loss_by_band', {})))
  if bands:
    lines += ['', '## Loss by position band (nats)', '', '| run | ' + ' | '.join(bands) + ' |',
              '|---|' + '---|' * len(bands)]
    for label, run in zip(labels, runs):
      lines.append(f'| {label} | ' + ' | '.join(_number(run.get('loss_by_band', {}).get(b)) for b in bands) + ' |')
  lines += ['', '![compare.png](compare.png)', '']
  (out / 'compare.md').write_text('\n'.join(lines))
  summary = {'runs': labels, 'sources': [str(paths.resolve(p)) for p in run_dirs],
             'perplexity': {label: run['perplexity'] for label, run in zip(labels, runs)},
             'passkey': {label: run['passkey'] for label, run in zip(labels, runs)},
             'loss_by_band': {label: run.get('loss_by_band', {}) for label, run in zip(labels, runs)}}
  (out / 'compare.json').write_text(json.dumps(summary, indent=1))
  return summary


# ---------------------------------------------------------------------------------------------
# Command line. Flags are defined only when this module runs as the program, so importing it
# (tests, notebooks, nopejax.train in the same process) defines none.


def _fail(message, code=2):
  config.exit_with_sentence(message, code)


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  from configs import base
  config_flags.DEFINE_config_dict(
      'config', base.get_config(),
      'Overrides of the run\'s saved config: eval.*, model.temperature, data.* corpus keys.',
      lock_config=True)
  flags.DEFINE_string('workdir', None, 'The run to evaluate (a pretraining or search workdir).')
  flags.DEFINE_bool('compare', False, 'Compare evaluated runs: their directories follow as arguments.')
  flags.DEFINE_string('out', None, 'Output directory (default WORKDIR/eval, WORKDIR/eval_cX with a temperature, '
                      'or eval_compare with --compare).')


def _override_keys(argv) -> list[str]:
  return [arg[len('--config.'):].split('=')[0] for arg in argv[1:] if arg.startswith('--config.')]


def _parse_flags(argv):
  """absl flag parsing; a bad flag or override ends in one sentence and exit code 2."""
  from absl import flags
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError, SyntaxError) as e:
    _fail(f'{" ".join(str(e).split())}; check the flag against configs/base.py.')


class _QuietLibraries(logging_std.Filter):
  """Keeps orbax's, grain's and tfds's per-file INFO lines out of the progress log."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or not any(
        f'/{lib}/' in record.pathname for lib in ('orbax', 'grain', 'jax', 'tensorflow_datasets'))


def main(argv):
  from absl import flags
  FLAGS = flags.FLAGS
  logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    if FLAGS.compare:
      if FLAGS.workdir or _override_keys(sys.argv):
        raise ConfigError('--compare reads finished evaluations; drop --workdir and --config.* or run them separately.')
      compare(argv[1:], FLAGS.out or 'eval_compare')
      return
    if len(argv) > 1:
      raise ConfigError(f'Unexpected arguments {argv[1:]}; every setting is a --config.key=value flag '
                        '(or use --compare DIR ...).')
    if not FLAGS.workdir:
      raise ConfigError('No --workdir given; pass --workdir DIR of a trained run (or --compare DIR ...).')
    overrides = {}
    for key in _override_keys(sys.argv):
      node = FLAGS.config
      for name in key.split('.'):
        node = node[name]
      overrides[key] = node
    evaluate(FLAGS.workdir, overrides, FLAGS.out)
  except ConfigError as e:
    _fail(str(e))


def _check_override_keys(argv) -> None:
  # Before the flags exist: config_flags reads the overrides from sys.argv when defining them.
  for key in _override_keys(argv):
    if not config.is_declared(key):
      _fail(f'Unknown config key {key}; every key is declared in configs/base.py, check the spelling there.')


if __name__ == '__main__':
  from absl import app
  _check_override_keys(sys.argv)
  try:
    _define_flags()
  except Exception as e:  # config_flags parses the overrides' types here.
    _fail(f'{" ".join(str(e).split())}; check the --config.* flags against configs/base.py.')
  app.run(main, flags_parser=_parse_flags)
