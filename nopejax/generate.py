"""Text generation with the KV cache: greedy or sampled (temperature, top-k, top-p), batched prompts
of different lengths, optionally sharded on a mesh, each row stopping at the end-of-text token.

  python -m nopejax.generate --workdir runs/tiny --prompt 'def main(' --max_new_tokens 64
  python -m nopejax.generate --workdir runs/tiny --prompts_file prompts.txt --temperature 0.8 --top_p 0.95 \
      --out completions.jsonl
  python -m nopejax.generate --workdir runs/tiny --prompt 'import ' --attention_temperature 1.5

In a notebook: `model, cfg = nopejax.load(workdir)`, then `generate(model, tokenizer, ['def f('], 64)`.
`--temperature` is the sampling temperature (0 = greedy); `--attention_temperature` is the uniform
attention temperature c on q (as `--config.model.temperature` in `nopejax.evaluate`).
The byte tokenizer has no end-of-text token, so byte-level rows always run to max_new_tokens; a
SentencePiece model's EOS id stops a row. Models pretrained here never see EOS (documents are
packed with BOS only); imported models do.
"""
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nopejax import sharding
from nopejax.config import ConfigError

_FILL = -1  # Written after a row has stopped.


def end_of_text_id(tokenizer) -> int | None:
  """The tokenizer's end-of-text id: SentencePiece's EOS when its model defines one; None for bytes."""
  eos_id = getattr(tokenizer, 'eos_id', None)
  if eos_id is None and hasattr(tokenizer, '_processor'):
    eos_id = tokenizer._processor.eos_id()
  return eos_id if eos_id is not None and eos_id >= 0 else None


def sample(logits_BxV, keys_B, temperature, top_k, top_p, greedy: bool):
  """Next tokens_B (int32): the argmax when `greedy`, else a draw from softmax(logits / temperature)
  restricted to the top_k most likely tokens (0: all), then to the fewest whose probability reaches
  top_p (nucleus). Tokens tied with the last one kept are kept too. keys_B: one key per row."""
  if greedy:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  V = logits_BxV.shape[-1]
  logits_BxV = logits_BxV.astype(jnp.float32) / temperature
  sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)  # Descending.
  k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
  sorted_BxV = jnp.where(jnp.arange(V) < k, sorted_BxV, -jnp.inf)
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  # A token is kept when the tokens before it hold less than top_p: the first always is.
  kept_B = jnp.sum((jnp.cumsum(probs_BxV, axis=-1) - probs_BxV < top_p) & (jnp.arange(V) < k), axis=-1)
  threshold_B = jnp.take_along_axis(sorted_BxV, kept_B[:, None] - 1, axis=-1)
  logits_BxV = jnp.where(logits_BxV >= threshold_B, logits_BxV, -jnp.inf)
  return jax.vmap(jax.random.categorical)(keys_B, logits_BxV).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('graphdef', 'steps', 'query_chunk', 'greedy'))
def _decode(graphdef, state, prompts_BxP, lengths_B, rows_B, seed, temperature, top_k, top_p, stop_id,
            steps, query_chunk, greedy):
  model = nnx.merge(graphdef, state)
  B, P = prompts_BxP.shape
  # One key per prompt (its index in the caller's list) and step: a row's draws depend on neither
  # the batch it shares nor its padding.
  row_keys_B = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), rows_B)

  def pick(logits_BxV, step):
    keys_B = jax.vmap(jax.random.fold_in, (0, None))(row_keys_B, step)
    return sample(logits_BxV, keys_B, temperature, top_k, top_p, greedy)

  x_BxPxD, cache = model.prefill(prompts_BxP, P + steps, query_chunk)
  first_B = pick(model.head(x_BxPxD[jnp.arange(B), lengths_B - 1][:, None])[:, 0], 0)
  tokens_BxS = jnp.full((B, steps), _FILL, jnp.int32).at[:, 0].set(first_B)

  def running(carry):
    step, _, _, _, _, done_B = carry
    return (step < steps) & ~jnp.all(done_B)

  def step_fn(carry):
    step, token_B, cache, index_B, tokens_BxS, done_B = carry
    logits_BxV, cache = model.decode(token_B, cache, index_B)
    next_B = jnp.where(done_B, _FILL, pick(logits_BxV, step))
    tokens_BxS = jax.lax.dynamic_update_slice(tokens_BxS, next_B[:, None], (0, step))
    # A stopped row keeps decoding (its tokens are discarded): the batch moves in lockstep.
    token_B = jnp.where(done_B, 0, next_B)
    return step + 1, token_B, cache, index_B + 1, tokens_BxS, done_B | (next_B == stop_id)

  carry = (jnp.int32(1), first_B, cache, lengths_B, tokens_BxS, first_B == stop_id)
  return jax.lax.while_loop(running, step_fn, carry)[4]


def _batch_ways(mesh, rules) -> int:
  axes = sharding.logical_spec(('batch',), rules)[0]
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else tuple(axes or ())))


def decode_batch(model, prompts_BxP, prompt_lengths_B, steps: int, query_chunk: int = 256, temperature=0.0,
                 top_k=0, top_p=1.0, seed=0, stop_id=None, rows_B=None, mesh=None) -> np.ndarray:
  """Continuations of right-padded prompts with a KV cache: tokens_BxSteps (int32, -1 after a stop).

  Row b's prompt is prompts_BxP[b, :prompt_lengths_B[b]]; the padding after it is never attended.
  One prefill over the prompts, then single-token decoding steps in one jitted while loop that ends
  when every row has produced `stop_id` (kept in the output) or after `steps` tokens. rows_B: the
  rows' ids for the sampling keys (default 0 .. B-1). mesh: rows split over the mesh's batch axes
  and parameters placed by their logical axes (model.rules); B must divide into the batch axes.
  """
  prompts_BxP = np.asarray(prompts_BxP, np.int32)
  B = prompts_BxP.shape[0]
  rows_B = np.arange(B) if rows_B is None else rows_B
  graphdef, state = nnx.split(model)
  inputs = [prompts_BxP, np.asarray(prompt_lengths_B, np.int32), np.asarray(rows_B, np.int32)]
  if mesh is None:
    inputs = [jnp.asarray(a) for a in inputs]
  else:
    state = jax.device_put(state, sharding.state_shardings(state, mesh, model.rules))
    rows = jax.sharding.NamedSharding(mesh, sharding.logical_spec(('batch',), model.rules))
    inputs = [jax.device_put(inputs[0], sharding.batch_sharding(mesh, model.rules))] + [
        jax.device_put(a, rows) for a in inputs[1:]]
  run = functools.partial(_decode, graphdef, state, *inputs, jnp.uint32(seed), jnp.float32(temperature or 1.0),
                          jnp.int32(top_k), jnp.float32(top_p), jnp.int32(_FILL if stop_id is None else stop_id),
                          steps=steps, query_chunk=query_chunk, greedy=not temperature)
  if mesh is None:
    return np.asarray(run())
  with jax.set_mesh(mesh):
    return np.asarray(run())


def greedy_decode(model, prompts_BxP, prompt_lengths_B, steps: int, query_chunk: int) -> np.ndarray:
  """Greedy continuation of right-padded prompts with a KV cache, exactly `steps` tokens: tokens_BxSteps."""
  return decode_batch(model, prompts_BxP, prompt_lengths_B, steps, query_chunk)


def generate_ids(model, prompts, max_new_tokens: int, temperature=0.0, top_k=0, top_p=1.0, seed=0, stop_id=None,
                 batch_size=None, query_chunk=256, mesh=None) -> list[np.ndarray]:
  """Generated ids of each prompt (a list of 1-D id arrays), without the stop token.

  Batches of `batch_size` prompts (default all), each rounded up to a multiple of the mesh's batch
  ways with copies of its first prompt; every batch is padded to the longest prompt of all, so
  they share one compiled program.
  """
  check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
  prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
  if any(len(p) == 0 for p in prompts):
    raise ConfigError(f'Prompt {next(i for i, p in enumerate(prompts) if len(p) == 0)} has no tokens; '
                      'give every prompt some text.')
  ways = 1 if mesh is None else _batch_ways(mesh, model.rules)
  batch_size = batch_size or len(prompts)
  batch_size = -(-batch_size // ways) * ways
  width = max(len(p) for p in prompts)
  outputs = []
  for first in range(0, len(prompts), batch_size):
    rows = list(range(first, min(first + batch_size, len(prompts))))
    rows += [rows[0]] * (batch_size - len(rows))
    prompts_BxP = np.zeros((batch_size, width), np.int32)
    for b, row in enumerate(rows):
      prompts_BxP[b, :len(prompts[row])] = prompts[row]
    tokens_BxS = decode_batch(model, prompts_BxP, [len(prompts[r]) for r in rows], max_new_tokens, query_chunk,
                              temperature, top_k, top_p, seed, stop_id, rows, mesh)
    for tokens_S in tokens_BxS[:min(batch_size, len(prompts) - first)]:
      stops = np.flatnonzero((tokens_S == _FILL) | ((tokens_S == stop_id) if stop_id is not None else False))
      outputs.append(tokens_S[:stops[0]] if len(stops) else tokens_S)
  return outputs


def generate(model, tokenizer, prompts, max_new_tokens: int, temperature=0.0, top_k=0, top_p=1.0, seed=0,
             batch_size=None, query_chunk=256, mesh=None) -> list[str]:
  """The completion of each prompt (a string or a list of them), as text.

  Prompts are encoded as documents (BOS first when the tokenizer has one); a row stops at the
  tokenizer's end-of-text id (end_of_text_id; never for bytes) or after max_new_tokens.
  temperature 0 is greedy; otherwise top_k (0: off) and top_p (1: off) filter the distribution and
  `seed` makes the draws reproducible. See generate_ids for batching and the mesh.
  """
  from nopejax import data  # Here so that importing this module (as passkey does) stays light.
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  ids = generate_ids(model, [data.encode_document(tokenizer, p) for p in prompts], max_new_tokens, temperature,
                     top_k, top_p, seed, end_of_text_id(tokenizer), batch_size, query_chunk, mesh)
  return [tokenizer.decode(i) for i in ids]


def check_sampling(max_new_tokens, temperature, top_k, top_p, seed=0) -> None:
  """ConfigError (one sentence) for settings no sampler accepts."""
  if not (isinstance(max_new_tokens, (int, np.integer)) and max_new_tokens >= 1):
    raise ConfigError(f'max_new_tokens={max_new_tokens} must be a positive integer; pass e.g. 64.')
  if not temperature >= 0:
    raise ConfigError(f'temperature={temperature} must not be negative; pass 0 for greedy or e.g. 0.8.')
  if not top_k >= 0:
    raise ConfigError(f'top_k={top_k} must not be negative; pass 0 to keep every token or e.g. 40.')
  if not 0 < top_p <= 1:
    raise ConfigError(f'top_p={top_p} must be in (0, 1]; pass 1 to keep every token or e.g. 0.95.')
  if not 0 <= seed < 2 ** 32:
    raise ConfigError(f'seed={seed} must be in [0, 2^32); pass e.g. 0.')


def make_mesh(cfg):
  """The run's mesh (mesh.*) over this machine's devices, or all of them on the data axis when the
  run's sizes do not fit them (a pod's run on a laptop)."""
  try:
    shape = sharding.mesh_shape(cfg, jax.device_count())
  except ConfigError:
    shape = (jax.device_count(), 1, 1)
  return jax.make_mesh(shape, sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


# ---------------------------------------------------------------------------------------------
# The command line. Flags are defined only when this module runs as the program.


def _define_flags():
  from absl import flags
  flags.DEFINE_string('workdir', None, 'The run whose latest checkpoint generates.')
  flags.DEFINE_multi_string('prompt', [], 'A prompt (repeat the flag for several).')
  flags.DEFINE_string('prompts_file', None, 'A text file of prompts, one per line (blank lines skipped).')
  flags.DEFINE_integer('max_new_tokens', 128, 'Tokens generated per prompt at most.')
  flags.DEFINE_float('temperature', 0.0, 'Sampling temperature on the logits; 0 = greedy.')
  flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens; 0 = all.')
  flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling: the fewest tokens whose probability reaches p; 1 = all.')
  flags.DEFINE_integer('seed', 0, 'Seeds the sampling.')
  flags.DEFINE_float('attention_temperature', None, 'Uniform attention temperature c on every head (the '
                     'zero-shot scaling, model.temperature); default as trained.')
  flags.DEFINE_integer('batch_size', 8, 'Prompts per decoding batch.')
  flags.DEFINE_integer('query_chunk', 256, 'Queries per attention chunk in the prefill.')
  flags.DEFINE_string('out', None, 'Also write {"prompt", "completion"} per line to this JSONL file.')


def _read_prompts(prompt_flags, prompts_file) -> list[str]:
  from etils import epath
  prompts = list(prompt_flags)
  if prompts_file:
    path = epath.Path(prompts_file)
    if not path.is_file():
      raise ConfigError(f'--prompts_file={prompts_file} does not exist; pass a text file with one prompt per line.')
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
      raise ConfigError(f'--prompts_file={prompts_file} holds no prompt; write one prompt per line.')
    prompts += lines
  if not prompts:
    raise ConfigError('No prompt given; pass --prompt TEXT (repeatable) or --prompts_file FILE.')
  return prompts


def main(argv):
  from absl import flags
  import nopejax
  from nopejax import config, data
  FLAGS = flags.FLAGS
  try:
    if len(argv) > 1:
      raise ConfigError(f'Unexpected arguments {argv[1:]}; pass prompts with --prompt or --prompts_file.')
    if not FLAGS.workdir:
      raise ConfigError('No --workdir given; pass --workdir DIR of a trained run.')
    check_sampling(FLAGS.max_new_tokens, FLAGS.temperature, FLAGS.top_k, FLAGS.top_p, FLAGS.seed)
    for name in ('batch_size', 'query_chunk'):
      if FLAGS[name].value <= 0:
        raise ConfigError(f'--{name}={FLAGS[name].value} must be positive; pass e.g. 8.')
    if FLAGS.attention_temperature is not None and not FLAGS.attention_temperature > 0:
      raise ConfigError(f'--attention_temperature={FLAGS.attention_temperature} must be positive; pass e.g. 1.5.')
    prompts = _read_prompts(FLAGS.prompt, FLAGS.prompts_file)
    model, cfg = nopejax.load(FLAGS.workdir, FLAGS.attention_temperature)
    tokenizer = data.make_tokenizer(cfg)
    completions = generate(model, tokenizer, prompts, FLAGS.max_new_tokens, FLAGS.temperature, FLAGS.top_k,
                           FLAGS.top_p, FLAGS.seed, FLAGS.batch_size, FLAGS.query_chunk, make_mesh(cfg))
  except ConfigError as e:
    config.exit_with_sentence(str(e))
  records = [{'prompt': p, 'completion': c} for p, c in zip(prompts, completions)]
  if FLAGS.out:
    from etils import epath
    epath.Path(FLAGS.out).write_text(''.join(json.dumps(r) + '\n' for r in records))
  for r in records:  # One prompt: its text and completion; several: a JSON object per line.
    print(r['prompt'] + r['completion'] if len(records) == 1 else json.dumps(r))


def _parse_flags(argv):
  """absl flag parsing; a bad flag ends in one sentence and exit code 2."""
  from nopejax import host
  return host.parse_command_flags(argv, 'see python -m nopejax.generate --help.')


if __name__ == '__main__':
  from absl import app
  _define_flags()
  app.run(main, flags_parser=_parse_flags)
