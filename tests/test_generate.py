"""generate.py: cached decoding equals full forward passes (on a mesh too), the samplers, the stop at
end-of-text, and the command line on a trained workdir."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import small_config
from nopejax import data, generate, model
from nopejax.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def tiny():
  """(model, mesh of 2 data x 2 fsdp x 2 tensor, prompts of 5 lengths): batch ways 4, so 5 rows pad to 8."""
  cfg = small_config()
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
  m = model.Transformer(cfg, nnx.Rngs(3))
  for block in m.blocks:
    block.attention.temperature[...] = jnp.array([1.0, 1.5, 2.0, 1.2])
  key = jax.random.key(6)
  prompts = [np.asarray(jax.random.randint(jax.random.fold_in(key, n), (n,), 0, 256)) for n in (7, 11, 1, 9, 4)]
  return m, generate.make_mesh(cfg), prompts


def test_greedy_with_the_cache_on_a_mesh_equals_the_argmax_of_full_forward_passes(tiny):
  m, mesh, prompts = tiny
  assert mesh.shape == {'data': 2, 'fsdp': 2, 'tensor': 2}
  steps = 5
  generated = generate.generate_ids(m, prompts, steps, mesh=mesh, query_chunk=4)
  # Greedy by full forward passes over a fixed-width buffer: causal, so the padding after the
  # sequence changes no logit before it, and one compiled forward serves every step.
  full_forward = nnx.jit(lambda m, tokens: m(tokens))
  for prompt, tokens in zip(prompts, generated):
    buffer = np.zeros((1, 16), np.int32)
    buffer[0, :len(prompt)] = prompt
    for step in range(steps):
      logits = full_forward(m, jnp.asarray(buffer))
      buffer[0, len(prompt) + step] = int(jnp.argmax(logits[0, len(prompt) + step - 1]))
    assert list(tokens) == list(buffer[0, len(prompt):len(prompt) + steps])
  unsharded = generate.generate_ids(m, prompts, steps, batch_size=2, query_chunk=4)
  assert all(np.array_equal(a, b) for a, b in zip(generated, unsharded))


def test_top_k_1_and_a_tiny_top_p_are_greedy(tiny):
  m, _, prompts = tiny
  greedy = generate.generate_ids(m, prompts, 5)
  for kwargs in ({'top_k': 1}, {'top_p': 1e-6}):
    sampled = generate.generate_ids(m, prompts, 5, temperature=1.0, seed=5, **kwargs)
    assert all(np.array_equal(a, b) for a, b in zip(greedy, sampled)), kwargs


def test_a_seed_reproduces_whatever_the_batching_and_another_seed_differs(tiny):
  m, mesh, prompts = tiny
  run = lambda seed, **kw: generate.generate_ids(m, prompts, 5, temperature=1.5, top_k=50, top_p=0.95, seed=seed, **kw)
  first = run(1)
  assert all(np.array_equal(a, b) for a, b in zip(first, run(1, batch_size=2)))
  assert all(np.array_equal(a, b) for a, b in zip(first, run(1, mesh=mesh)))
  assert not all(np.array_equal(a, b) for a, b in zip(first, run(2)))


def test_a_row_stops_at_end_of_text_and_the_others_go_on(tiny):
  m, _, prompts = tiny
  assert generate.end_of_text_id(data.ByteTokenizer()) is None  # Bytes have no end-of-text token.
  greedy = generate.generate_ids(m, prompts, 5)
  stop = int(greedy[0][2])
  stopped = generate.generate_ids(m, prompts, 5, stop_id=stop)
  for full, cut in zip(greedy, stopped):
    hits = np.flatnonzero(full == stop)
    assert list(cut) == list(full[:hits[0]] if len(hits) else full)
  assert len(stopped[0]) <= 2
  tokenizer = data.ByteTokenizer()
  tokenizer.eos_id = stop  # As a SentencePiece model's EOS.
  texts = generate.generate(m, tokenizer, [bytes(p.astype(np.uint8)).decode('latin-1') for p in prompts[:1]], 5)
  assert generate.end_of_text_id(tokenizer) == stop and len(texts) == 1


def test_bad_settings_are_one_sentence():
  good = {'max_new_tokens': 4, 'temperature': 0.0, 'top_k': 0, 'top_p': 1.0, 'seed': 0}
  for bad, message in (({'max_new_tokens': 0}, 'max_new_tokens=0 must be a positive integer'),
                       ({'temperature': -0.5}, 'temperature=-0.5 must not be negative'),
                       ({'top_k': -1}, 'top_k=-1 must not be negative'), ({'top_p': 0.0}, r'top_p=0.0 must be in \(0, 1\]'),
                       ({'seed': -1}, r'seed=-1 must be in \[0, 2\^32\)')):
    with pytest.raises(ConfigError, match=message):
      generate.check_sampling(**{**good, **bad})
  generate.check_sampling(**good)


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'nopejax.generate', *args], capture_output=True, text=True,
                        cwd=ROOT, timeout=180)


def test_cli_generates_for_each_prompt_into_jsonl(small_run, tmp_path):
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('def main(\n\nimport os\n')
  out = tmp_path / 'out.jsonl'
  result = _cli('--workdir', small_run[1], '--prompts_file', str(prompts), '--prompt', 'class A',
                '--max_new_tokens', '5', '--temperature', '0.8', '--top_p', '0.9', '--out', str(out))
  assert result.returncode == 0, result.stderr[-2000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [row['prompt'] for row in rows] == ['class A', 'def main(', 'import os']
  assert all(0 < len(row['completion'].encode('utf-8', 'surrogateescape')) <= 5 * 3 for row in rows)


def test_cli_bad_input_is_one_sentence_and_exit_2(tmp_path):
  empty = tmp_path / 'empty.txt'
  empty.write_text('\n\n')
  for args, sentence in (
      (['--workdir', str(tmp_path), '--prompt', 'x', '--top_p', '1.5'], 'top_p=1.5 must be in (0, 1]'),
      (['--workdir', str(tmp_path), '--prompts_file', str(empty)], 'holds no prompt'),
      (['--workdir', str(tmp_path / 'missing'), '--prompt', 'x'], 'is not a nopejax workdir')):
    result = _cli(*args)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ') and sentence in last, last
