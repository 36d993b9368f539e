"""RULER's synthetic long-context tasks (Hsieh et al. 2024, github.com/NVIDIA/RULER), generated offline
and deterministically at any length, scored from greedy decoding with the KV cache.

  niah_multikey      four key-value needles in filler; the value of one key (RULER's niah_multikey_1)
  niah_multivalue    one key with four values in filler; all four (niah_multivalue)
  variable_tracking  VAR A = 12345, VAR B = VAR A, ... (4 hops) in filler; every variable holding the value (vt)
  common_words       a numbered list where 10 words occur 6 times (30 from 4096 tokens) and the others
                     once (3 times); those 10 (cwe)

Templates, needles, counts and the scoring follow RULER's scripts. So that nothing is downloaded and short
lengths fit: the filler is the passkey's repeated sentences (RULER's 'repeat' haystack, where its
multi-key and multi-value tasks read essays), words are pseudo-words of consonant-vowel syllables (RULER
draws English words), and no few-shot example precedes the variable-tracking and common-words prompts.
Each prompt ends with RULER's answer prefix, so a base model continues with the answer. An example is
correct iff the greedy continuation, as many tokens as the reference answer, contains every expected
string, case-insensitively (RULER's string_match_all, all or nothing).
"""
import functools
import math

import numpy as np

from nopejax import data, generate

TASKS = ('niah_multikey', 'niah_multivalue', 'variable_tracking', 'common_words')

NOISE = 'The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.'
NIAH_NEEDLE = 'One of the special magic numbers for {key} is: {value}.'
NIAH_ONE = ('A special magic number is hidden within the following text. Make sure to memorize it. I will quiz you '
            'about the number afterwards.\n{context}\nWhat is the special magic number for {query} mentioned in the '
            'provided text? The special magic number for {query} mentioned in the provided text is')
NIAH_ALL = ('Some special magic numbers are hidden within the following text. Make sure to memorize it. I will quiz '
            'you about the numbers afterwards.\n{context}\nWhat are all the special magic numbers for {query} '
            'mentioned in the provided text? The special magic numbers for {query} mentioned in the provided text are')
VT_TEMPLATE = ('Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n'
               'Question: Find all variables that are assigned the value {query} in the text above. Answer: According '
               'to the chain(s) of variable assignment in the text above, {count} variables are assigned the value '
               '{query}, they are:')
CWE_TEMPLATE = ('Below is a numbered list of words. In these words, some appear more often than others. Memorize the '
                'ones that appear most often.\n{context}\nQuestion: What are the {count} most common words in the above '
                'list? Answer: The top {count} words that appear most often in the list are:')

NIAH_KEYS = 4  # niah_multikey_1's num_needle_k.
NIAH_VALUES = 4  # niah_multivalue's num_needle_v.
VT_HOPS = 4
CWE_COMMON = 10
CWE_LONG = 4096  # From this length in tokens RULER repeats the words (30, 3) times, below it (6, 1).

_CONSONANTS, _VOWELS = 'bdfgklmnprstvz', 'aeiou'


def pseudo_words(rng, count: int, syllables: int = 3) -> list[str]:
  """`count` distinct pronounceable lowercase words of `syllables` consonant-vowel pairs.

  Drawn from a stream of their own in fixed chunks, so the first k words are the same for any
  count >= k: an example's length then grows smoothly with its number of words.
  """
  base = len(_CONSONANTS) * len(_VOWELS)
  source = np.random.default_rng(int(rng.integers(2 ** 63)))
  picks = {}  # An ordered set.
  while len(picks) < count:
    for pick in source.integers(base ** syllables, size=1024).tolist():
      picks.setdefault(pick, None)
      if len(picks) == count:
        break
  words = []
  for pick in picks:
    word = ''
    for _ in range(syllables):
      pick, syllable = divmod(pick, base)
      word += _CONSONANTS[syllable // len(_VOWELS)] + _VOWELS[syllable % len(_VOWELS)]
    words.append(word)
  return words


def _insert(rng, fillers: list[str], items: list[str]) -> list[str]:
  """`items` in order at random places among `fillers` (any of them may be adjacent)."""
  total = len(fillers) + len(items)
  slots = set(rng.choice(total, size=len(items), replace=False).tolist())
  items, fillers = iter(items), iter(fillers)
  return [next(items) if i in slots else next(fillers) for i in range(total)]


def _niah(rng, n: int, keys: int, values: int):
  names = ['-'.join(pair) for pair in zip(*[iter(pseudo_words(rng, 2 * keys, 2))] * 2)]
  numbers = (rng.choice(9_000_000, size=keys * values, replace=False) + 1_000_000).tolist()
  needles = [(names[i // values], numbers[i]) for i in range(keys * values)]
  needles = [needles[i] for i in rng.permutation(len(needles))]  # RULER shuffles the needles.
  query = names[int(rng.integers(keys))]
  expected = [str(value) for key, value in needles if key == query]  # In the order the text gives them.
  context = '\n'.join(_insert(rng, [NOISE] * n, [NIAH_NEEDLE.format(key=k, value=v) for k, v in needles]))
  template = NIAH_ONE if len(expected) == 1 else NIAH_ALL
  return template.format(context=context, query=query), ' ' + ', '.join(expected), expected


def niah_multikey(rng, n: int, length: int):
  """(prompt, answer, expected) with `n` filler sentences: one value for each of NIAH_KEYS keys."""
  return _niah(rng, n, NIAH_KEYS, 1)


def niah_multivalue(rng, n: int, length: int):
  """(prompt, answer, expected) with `n` filler sentences: NIAH_VALUES values for one key."""
  return _niah(rng, n, 1, NIAH_VALUES)


def variable_tracking(rng, n: int, length: int):
  """(prompt, answer, expected) with `n` filler sentences: the VT_HOPS + 1 variables of one chain."""
  names = [''.join(chr(65 + (int(p) // 26 ** i) % 26) for i in range(5))
           for p in rng.choice(26 ** 5, size=VT_HOPS + 1, replace=False)]
  value = int(rng.integers(10000, 100000))
  chain = [f'VAR {names[0]} = {value}'] + [f'VAR {names[i + 1]} = VAR {names[i]} ' for i in range(VT_HOPS)]
  context = ' '.join(_insert(rng, [NOISE + '\n'] * n, chain)).replace('. \n', '.\n')
  prompt = VT_TEMPLATE.format(context=context, query=value, count=VT_HOPS + 1)
  return prompt, ' ' + ' '.join(names), names


def common_words(rng, n: int, length: int):
  """(prompt, answer, expected) with `n` distinct words in the list: the CWE_COMMON most frequent."""
  common_repeats, other_repeats = (30, 3) if length >= CWE_LONG else (6, 1)
  words = pseudo_words(rng, n)
  listing = words[:CWE_COMMON] * common_repeats + words[CWE_COMMON:] * other_repeats
  listing = [listing[i] for i in rng.permutation(len(listing))]
  prompt = CWE_TEMPLATE.format(context=' '.join(f'{i + 1}. {w}' for i, w in enumerate(listing)), count=CWE_COMMON)
  answer = ' ' + ' '.join(f'{i + 1}. {w}' for i, w in enumerate(words[:CWE_COMMON]))
  return prompt, answer, words[:CWE_COMMON]


_BUILDERS = {'niah_multikey': niah_multikey, 'niah_multivalue': niah_multivalue,
             'variable_tracking': variable_tracking, 'common_words': common_words}
_FEWEST = {'common_words': CWE_COMMON + 1}  # Filler units below which a task means nothing; else 0.


def continuation_ids(tokenizer, prompt: str, answer: str) -> np.ndarray:
  """The ids `answer` adds after the prompt's (as the model must generate them); encode(answer) when the
  prompt's ids are not a prefix of the whole text's."""
  prompt_ids, full_ids = tokenizer.encode(prompt), tokenizer.encode(prompt + answer)
  if len(full_ids) > len(prompt_ids) and np.array_equal(full_ids[:len(prompt_ids)], prompt_ids):
    return np.asarray(full_ids[len(prompt_ids):], np.int32)
  return np.asarray(tokenizer.encode(answer), np.int32)


def _build(task, tokenizer, length, seed, index, n) -> dict:
  rng = np.random.default_rng([seed, TASKS.index(task), index])
  prompt, answer, expected = _BUILDERS[task](rng, n, length)
  prompt_ids = data.encode_document(tokenizer, prompt)
  answer_ids = continuation_ids(tokenizer, prompt, answer)
  return {'prompt_ids': prompt_ids, 'answer_ids': answer_ids, 'expected': expected, 'filler': n,
          'tokens': len(prompt_ids) + len(answer_ids)}


def _most_filler(build, fewest: int, guess: int) -> dict | None:
  """build(n) for the largest n >= fewest whose example fits, found by galloping from `guess` and then
  bisecting (the length grows with n, though not always strictly with subword merges); None when
  not even build(fewest)'s example fits."""
  guess = max(guess, fewest)
  if build(guess)['fits']:
    low, step = guess, 1
    while build(low + step)['fits']:
      low, step = low + step, 2 * step
    high = low + step
  else:
    high, step = guess, 1
    while high - step > fewest and not build(high - step)['fits']:
      high, step = high - step, 2 * step
    low = max(fewest, high - step)
    if not build(low)['fits']:
      return None
  while high - low > 1:  # build(low) fits, build(high) does not.
    middle = (low + high) // 2
    low, high = (middle, high) if build(middle)['fits'] else (low, middle)
  return build(low)


def examples(task: str, tokenizer, length: int, count: int, seed: int) -> list[dict] | None:
  """`count` examples of `task` whose prompt and answer together are at most `length` tokens, or None
  when the bare template does not fit. Each: {'prompt_ids', 'answer_ids', 'expected', 'filler', 'tokens'}.

  Example i depends only on (seed, task, i) and its amount of filler, the most that fits: so every
  example ends within about one filler unit (a sentence, a word's entries) of `length`.
  """
  built = {}

  def build(index, n):
    if (index, n) not in built:
      example = _build(task, tokenizer, length, seed, index, n)
      built[index, n] = dict(example, fits=example['tokens'] <= length)
    return built[index, n]

  chosen, guess = [], 0
  for index in range(count):
    example = _most_filler(functools.partial(build, index), _FEWEST.get(task, 0), guess)
    if example is None:
      return None
    guess = example['filler']  # The next example needs about as much.
    chosen.append({key: value for key, value in example.items() if key != 'fits'})
  return chosen


def score(text: str, expected) -> float:
  """1.0 iff `text` contains every expected string (case-insensitive), else 0.0."""
  return float(all(e.lower() in text.lower() for e in expected))


def ruler(model, tokenizer, length: int, count: int, batch_size: int, query_chunk: int, seed: int,
          tasks=TASKS) -> dict:
  """Accuracy of each task at `length`: {task: {'accuracy', 'prompts', 'prompt_tokens'} or None when
  its template does not fit}.

  The tasks' examples share batches (padded to the longest prompt at this length); a batch decodes
  as many steps as its longest answer, rounded up to a power of two so few programs compile; each
  row is scored on its first len(answer) tokens.
  """
  per_task = {task: examples(task, tokenizer, length, count, seed) for task in tasks}
  pooled = [(task, example) for task, chosen in per_task.items() if chosen for example in chosen]
  correct = {task: [] for task in tasks}
  if pooled:
    width = max(len(example['prompt_ids']) for _, example in pooled)
    for first in range(0, len(pooled), batch_size):
      rows = pooled[first:first + batch_size]
      padded = rows + [rows[0]] * (batch_size - len(rows))
      prompts_BxP = np.zeros((batch_size, width), np.int32)
      for b, (_, example) in enumerate(padded):
        prompts_BxP[b, :len(example['prompt_ids'])] = example['prompt_ids']
      steps = 2 ** math.ceil(math.log2(max(len(example['answer_ids']) for _, example in rows)))
      generated_BxS = generate.greedy_decode(model, prompts_BxP, [len(e['prompt_ids']) for _, e in padded], steps,
                                             query_chunk)
      for b, (task, example) in enumerate(rows):
        text = tokenizer.decode(generated_BxS[b, :len(example['answer_ids'])])
        correct[task].append(score(text, example['expected']))
  return {task: None if not per_task[task] else {
      'accuracy': float(np.mean(correct[task])), 'prompts': len(correct[task]),
      'prompt_tokens': float(np.mean([len(e['prompt_ids']) for e in per_task[task]]))} for task in tasks}
