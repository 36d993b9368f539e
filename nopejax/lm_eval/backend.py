"""The `nopejax` model of lm-evaluation-harness: a workdir's latest model answering lm-eval's three
request types (see the package docstring for the command line)."""
import collections
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval import utils
from lm_eval.api import model as lm_model
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

import nopejax
from nopejax import data, generate
from nopejax.config import ConfigError

NEWLINE_ID = 10  # The prefix token of a byte-level model, which has neither BOS nor EOS.
MIN_BUCKET = 16


def bucket_length(n: int, max_length: int) -> int:
  """The padded length of a batch whose longest input has n tokens: a power of two (at least 16)
  up to max_length, so a whole evaluation compiles a handful of shapes."""
  return min(max(MIN_BUCKET, 1 << (n - 1).bit_length()), max(max_length, n))


@functools.partial(jax.jit, static_argnames=('graphdef', 'query_chunk'))
def _token_scores(graphdef, state, tokens_BxN, query_chunk):
  """Log-probability of each next token tokens_BxN[:, 1:] and whether it is the argmax: two [B, N-1].

  The model reads tokens_BxN[:, :-1]; logits are formed `query_chunk` positions at a time, so they
  never exceed B x query_chunk x V.
  """
  model = nnx.merge(graphdef, state)
  x_BxTxD, _ = model.forward_chunked(tokens_BxN[:, :-1], query_chunk)
  targets_BxT = tokens_BxN[:, 1:]
  B, T, D = x_BxTxD.shape
  C = min(query_chunk, T)
  num_chunks = -(-T // C)
  pad = num_chunks * C - T
  x_NxBxCxD = jnp.pad(x_BxTxD, ((0, 0), (0, pad), (0, 0))).reshape(B, num_chunks, C, D).swapaxes(0, 1)
  targets_NxBxC = jnp.pad(targets_BxT, ((0, 0), (0, pad))).reshape(B, num_chunks, C).swapaxes(0, 1)

  def one_chunk(inputs):
    x_BxCxD, targets_BxC = inputs
    logits_BxCxV = model.head(x_BxCxD)
    target_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    logprob_BxC = target_BxC - jax.nn.logsumexp(logits_BxCxV, axis=-1)
    return logprob_BxC, jnp.argmax(logits_BxCxV, axis=-1) == targets_BxC

  logprob_NxBxC, greedy_NxBxC = jax.lax.map(one_chunk, (x_NxBxCxD, targets_NxBxC))
  unchunk = lambda a_NxBxC: a_NxBxC.swapaxes(0, 1).reshape(B, num_chunks * C)[:, :T]
  return unchunk(logprob_NxBxC), unchunk(greedy_NxBxC)


def _positive_int(name, value):
  try:
    value = int(value)
  except (TypeError, ValueError):
    value = 0
  if value <= 0:
    raise ConfigError(f'{name}={value!r} must be a positive integer; pass e.g. {name}=8.')
  return value


@register_model('nopejax')
class NopeJaxLM(lm_model.TemplateLM):
  """A nopejax workdir's latest model for lm-eval, on the default device.

  workdir: any workdir nopejax writes (pretraining, search, from-hf conversion).
  temperature: a uniform attention temperature on every head instead of the checkpoint's.
  max_length: the longest window scored or prompted, in tokens (default data.seq_len, the
    training length); rolling loglikelihoods use windows of this length, and longer inputs are cut
    from the left, as in lm-eval's hf backend.
  batch_size: rows per jitted call (lm_eval's --batch_size; 'auto' means 8).
  max_gen_toks: generate_until's default budget when a task sets none.
  add_bos_token: put BOS before every encoded string (default: when the tokenizer has one).
  prefix_token_id: the token an empty context or a document's first window starts from (default
    BOS, else EOS, else newline for bytes).
  query_chunk: queries (and logit positions) per attention chunk.
  max_batch_size, device: accepted because lm_eval's command line passes them; jax picks the device.
  """

  def __init__(self, workdir=None, temperature=None, max_length=None, batch_size=8, max_gen_toks=256,
               add_bos_token=None, prefix_token_id=None, query_chunk=256, max_batch_size=None, device=None, **unknown):
    super().__init__()
    if unknown:
      raise ConfigError(f'Unknown model_args {", ".join(sorted(unknown))}; pass workdir and optionally temperature, '
                        'max_length, max_gen_toks, add_bos_token, prefix_token_id, query_chunk.')
    if not workdir:
      raise ConfigError('No workdir given; pass --model_args workdir=DIR, a nopejax workdir.')
    auto = batch_size is None or str(batch_size).startswith('auto')
    self._batch_size = 8 if auto else _positive_int('batch_size', batch_size)
    self._max_gen_toks = _positive_int('max_gen_toks', max_gen_toks)
    self.query_chunk = _positive_int('query_chunk', query_chunk)
    max_length = None if max_length is None else _positive_int('max_length', max_length)
    self.workdir = str(workdir)
    self.model, self.cfg = nopejax.load(self.workdir, None if temperature is None else float(temperature))
    self.tokenizer = data.make_tokenizer(self.cfg)
    self._max_length = max_length or self.cfg.data.seq_len
    self.bos_id = self.tokenizer.bos_id
    self.add_bos_token = self.bos_id is not None if add_bos_token is None else bool(add_bos_token)
    if self.add_bos_token and self.bos_id is None:
      raise ConfigError(f'add_bos_token=True but the tokenizer {self.cfg.data.tokenizer!r} has no BOS; leave it unset.')
    eos_id = generate.end_of_text_id(self.tokenizer)
    self._eot_token_id = eos_id
    self._prefix_token_id = next(i for i in (prefix_token_id, self.bos_id, eos_id, NEWLINE_ID) if i is not None)
    self._graphdef, self._state = nnx.split(self.model)

  # ------------------------------------------------------------------------------------------
  # What lm-eval reads.

  @property
  def eot_token_id(self):
    return self._eot_token_id

  @property
  def prefix_token_id(self):
    return int(self._prefix_token_id)

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def tokenizer_name(self) -> str:
    return str(self.cfg.data.tokenizer)

  def get_model_info(self) -> dict:
    return {'workdir': self.workdir, 'position': self.cfg.model.position, 'max_length': self.max_length}

  def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None, **kwargs) -> list[int]:
    """Token ids of `string`, BOS first when add_special_tokens (default: add_bos_token) and the
    tokenizer has one, cut to the last left_truncate_len: as the hf backend encodes."""
    ids = [int(i) for i in np.asarray(self.tokenizer.encode(string)).reshape(-1)]
    add_bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
    if add_bos and self.bos_id is not None:
      ids = [int(self.bos_id)] + ids
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def tok_decode(self, ids) -> str:
    """Text of ids without SentencePiece's control and unknown pieces (which it would render as
    ' ⁇ '), as the hf backend decodes with skip_special_tokens."""
    processor = getattr(self.tokenizer, '_processor', None)
    if processor is not None:
      ids = [i for i in ids if not (processor.is_control(int(i)) or processor.is_unknown(int(i)))]
    return self.tokenizer.decode(np.asarray(ids, np.int32))

  # ------------------------------------------------------------------------------------------
  # Scoring.

  def score(self, rows, disable_tqdm=True) -> list[tuple[float, bool]]:
    """(sum of log-probabilities, all greedy) of each row's last `scored` tokens, rows being
    (token ids, scored): the model reads all ids but the last, each scored id given those before it.

    Rows run longest first in batches of batch_size, each padded to its bucket_length, so the
    batches of one evaluation share a few compiled shapes.
    """
    results = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    B = self.batch_size
    for start in tqdm(range(0, len(order), B), disable=disable_tqdm, desc='nopejax batches'):
      batch = order[start:start + B]
      T = bucket_length(max(len(rows[i][0]) for i in batch) - 1, self.max_length)
      tokens_BxN = np.zeros((B, T + 1), np.int32)
      scored_BxT = np.zeros((B, T), bool)
      for b, i in enumerate(batch):
        ids, scored = rows[i]
        tokens_BxN[b, :len(ids)] = ids
        scored_BxT[b, len(ids) - 1 - scored:len(ids) - 1] = True
      logprob_BxT, greedy_BxT = jax.device_get(
          _token_scores(self._graphdef, self._state, jnp.asarray(tokens_BxN), self.query_chunk))
      for b, i in enumerate(batch):
        mask_T = scored_BxT[b]
        results[i] = (float(np.sum(logprob_BxT[b][mask_T], dtype=np.float64)), bool(np.all(greedy_BxT[b][mask_T])))
    return results

  def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
    """requests: ((context, continuation) or None, context ids, continuation ids), from TemplateLM."""
    rows = []
    for _, context_ids, continuation_ids in requests:
      if not continuation_ids:
        raise ConfigError('A loglikelihood request has an empty continuation; check the task\'s doc_to_choice.')
      # As the hf backend: at most max_length + 1 tokens, cut from the left.
      rows.append(((list(context_ids) + list(continuation_ids))[-(self.max_length + 1):], len(continuation_ids)))
    results = self.score(rows, disable_tqdm)
    for (key, _, _), result in zip(requests, results):
      if key is not None:
        self.cache_hook.add_partial('loglikelihood', key, result)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm=False) -> list[float]:
    """Log-likelihood of each whole text, in max_length windows after the prefix token; every
    token is scored once, as lm-eval's hf backend windows it (get_rolling_token_windows)."""
    rows, owners = [], []
    for r, (text,) in enumerate(req.args for req in requests):
      windows = utils.get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                max_seq_len=self.max_length, context_len=1)
      for context_ids, continuation_ids in map(utils.make_disjoint_window, windows):
        rows.append((context_ids + continuation_ids, len(continuation_ids)))
        owners.append(r)
    totals = [0.0] * len(requests)
    for owner, (logprob, _) in zip(owners, self.score(rows, disable_tqdm)):
      totals[owner] += logprob
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial('loglikelihood_rolling', req.args, total)
    return totals

  # ------------------------------------------------------------------------------------------
  # Generation.

  def generate_until(self, requests, disable_tqdm=False) -> list[str]:
    """Each context's continuation with nopejax.generate (KV cache), cut before the first stop
    string of `until`; greedy unless the task samples. Contexts keep their last
    max_length - max_gen_toks tokens, as in the hf backend."""
    groups = collections.defaultdict(list)  # Requests with the same generation settings batch together.
    for i, req in enumerate(requests):
      groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
    outputs = [None] * len(requests)
    for indices in tqdm(groups.values(), disable=disable_tqdm, desc='nopejax generation'):
      gen_kwargs = requests[indices[0]].args[1]
      kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
      until = handle_stop_sequences(kwargs.pop('until', None), eos=None)  # EOS stops rows by id.
      steps = _positive_int('max_gen_toks', kwargs.pop('max_gen_toks'))
      if steps >= self.max_length:
        raise ConfigError(f'max_gen_toks={steps} leaves no room for a context in max_length={self.max_length}; '
                          'raise max_length or lower max_gen_toks.')
      sample = bool(kwargs.get('do_sample'))
      prompts = [self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - steps) for i in indices]
      prompts = [p or [self.prefix_token_id] for p in prompts]  # An empty context starts from the prefix token.
      ids = generate.generate_ids(
          self.model, prompts, steps, temperature=float(kwargs.get('temperature') or 0.0) if sample else 0.0,
          top_k=int(kwargs.get('top_k') or 0), top_p=float(kwargs.get('top_p') or 1.0),
          seed=int(kwargs.get('seed') or 0), stop_id=self.eot_token_id, batch_size=self.batch_size,
          query_chunk=self.query_chunk)
      for i, tokens in zip(indices, ids):
        outputs[i] = postprocess_generated_text(self.tok_decode(tokens), until, think_end_token=None)
        self.cache_hook.add_partial('generate_until', requests[i].args, outputs[i])
    return outputs
