"""Passkey retrieval (docs/method.md, section 5): the paper's prompt at a depth, greedy decoding with a KV cache."""
import numpy as np

from nopejax import data, generate

# The paper's passkey prompt (docs/method.md, section 5), byte for byte.
PASSKEY_INTRO = ('There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. '
                 'I will quiz you about the important information there.\n')
PASSKEY_GARBAGE = ' The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.'
PASSKEY_NEEDLE = '\nThe pass key is {key}. Remember it. {key} is the pass key.\n'
PASSKEY_QUESTION = '\nWhat is the pass key? The pass key is'


# Greedy cached decoding is generate.py's; named here so the passkey's callers (and tests) find it.
greedy_decode = generate.greedy_decode


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
