"""nopejax.lm_eval against lm-eval's own `hf` backend on the same requests.

tests/fixtures/lm_eval_task/hf_results.json holds what `--model hf` answered for the tiny Llama
tests/fixtures/hf_llama with that folder's tokenizer, as saved (RoPE) and with the rotation removed
(NoPE); tests/fixtures/make_lm_eval_fixture.py writes it. Here the same checkpoint converted with
from-hf answers the same requests: the RoPE model in this process, the NoPE model through
`python -m nopejax.lm_eval` and the task YAMLs, offline.
"""
import glob
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from lm_eval.api.instance import Instance

import nopejax.lm_eval as nopejax_lm_eval
from nopejax import convert
from nopejax.config import ConfigError

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / 'tests' / 'fixtures'
TASK_DIR = FIXTURES / 'lm_eval_task'
HF = json.loads((TASK_DIR / 'hf_results.json').read_text())
TOLERANCE = 1e-3


def converted(tmp_path_factory, position):
  workdir = tmp_path_factory.mktemp(position) / 'workdir'
  convert.from_hf(str(FIXTURES / 'hf_llama'), str(workdir), nope=position == 'nope',
                  tokenizer=str(TASK_DIR / 'tokenizer.model'))
  return str(workdir)


@pytest.fixture(scope='module')
def rope_lm(tmp_path_factory):
  return nopejax_lm_eval.NopeJaxLM(workdir=converted(tmp_path_factory, 'rope'), max_length=HF['max_length'],
                                   batch_size=4)


def instances(request_type, arguments):
  return [Instance(request_type, {}, args, i) for i, args in enumerate(arguments)]


def test_loglikelihood_equals_hf(rope_lm):
  expected = HF['rope']['loglikelihood']
  scored = []
  score = rope_lm._loglikelihood_tokens
  rope_lm._loglikelihood_tokens = lambda requests, **kwargs: scored.extend(requests) or score(requests, **kwargs)
  try:
    results = rope_lm.loglikelihood(instances('loglikelihood', [(e['context'], e['continuation']) for e in expected]),
                                    disable_tqdm=True)
  finally:
    del rope_lm._loglikelihood_tokens
  # The same token ids first (the empty context, and the truncated one, included) ...
  assert [(list(c), list(n)) for _, c, n in scored] == [(e['context_ids'], e['continuation_ids']) for e in expected]
  # ... then the same log-probabilities and greediness.
  difference = np.abs(np.array([r[0] for r in results]) - [e['logprob'] for e in expected])
  print(f'RoPE loglikelihood, {len(results)} requests: max |nopejax - hf| = {difference.max():.2e}')
  assert difference.max() < TOLERANCE, difference
  assert [r[1] for r in results] == [e['is_greedy'] for e in expected]


def test_loglikelihood_rolling_equals_hf(rope_lm):
  expected = HF['rope']['rolling']
  assert [rope_lm.tok_encode(e['text']) for e in expected] == [e['ids'] for e in expected]
  # Documents of 8 to 108 tokens: one to four windows of max_length 32.
  results = rope_lm.loglikelihood_rolling(instances('loglikelihood_rolling', [(e['text'],) for e in expected]),
                                          disable_tqdm=True)
  difference = np.abs(np.array(results) - [e['logprob'] for e in expected])
  print(f'RoPE loglikelihood_rolling, {len(results)} documents: max |nopejax - hf| = {difference.max():.2e}')
  assert difference.max() < TOLERANCE, difference


def test_generate_until_equals_hf_and_stops_at_a_stop_string(rope_lm):
  expected = HF['rope']['generate']
  requests = [(e['context'], e['gen_kwargs']) for e in expected]
  assert rope_lm.generate_until(instances('generate_until', requests), disable_tqdm=True) == [
      e['output'] for e in expected]
  # Without stop strings the model writes max_gen_toks tokens; with one taken from the middle of
  # a completion, that completion ends just before it.
  full = rope_lm.generate_until(instances('generate_until', [(c, {**k, 'until': []}) for c, k in requests]),
                                disable_tqdm=True)
  stop = full[1][4:6]
  cut = rope_lm.generate_until(instances('generate_until', [(c, {**k, 'until': [stop]}) for c, k in requests]),
                               disable_tqdm=True)
  assert cut[1] == full[1][:full[1].index(stop)] and len(cut[1]) < len(full[1])
  assert all(stop not in text and full[i].startswith(text) for i, text in enumerate(cut))


def test_cli_runs_the_task_yamls_offline_and_equals_hf(tmp_path_factory):
  """`python -m nopejax.lm_eval` with the three local tasks, on the NoPE model: every request's
  answer and every metric as the hf backend's."""
  workdir = converted(tmp_path_factory, 'nope')
  out = tmp_path_factory.mktemp('lm_eval_out')
  env = {**os.environ, 'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_CACHE': str(out / 'cache')}
  run = subprocess.run(
      [sys.executable, '-m', 'nopejax.lm_eval', '--model', 'nopejax',
       '--model_args', f'workdir={workdir},max_length={HF["max_length"]}',
       '--tasks', 'nopejax_choice,nopejax_rolling,nopejax_generate', '--include_path', str(TASK_DIR),
       '--batch_size', '4', '--output_path', str(out), '--log_samples'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
  assert run.returncode == 0, run.stderr[-3000:]
  samples = {task: [json.loads(line) for path in glob.glob(f'{out}/**/samples_{task}_*.jsonl', recursive=True)
                    for line in pathlib.Path(path).read_text().splitlines()]
             for task in ('nopejax_choice', 'nopejax_rolling', 'nopejax_generate')}
  hf = HF['nope']
  checks = {
      'loglikelihood': (
          {(e['context'], e['continuation']): e['logprob'] for e in hf['loglikelihood']},
          {(args['arg_0'], args['arg_1']): float(resp[0][0])
           for s in samples['nopejax_choice'] for args, resp in zip(s['arguments'].values(), s['resps'])}),
      'loglikelihood_rolling': (
          {e['text']: e['logprob'] for e in hf['rolling']},
          {s['arguments']['gen_args_0']['arg_0']: float(s['resps'][0][0]) for s in samples['nopejax_rolling']}),
  }
  for request_type, (expected, got) in checks.items():
    assert got.keys() == expected.keys()
    difference = max(abs(got[k] - expected[k]) for k in expected)
    print(f'NoPE {request_type} through the command line: max |nopejax - hf| = {difference:.2e}')
    assert difference < TOLERANCE
  assert sorted(s['resps'][0][0] for s in samples['nopejax_generate']) == sorted(e['output'] for e in hf['generate'])
  results = json.loads(pathlib.Path(glob.glob(f'{out}/**/results_*.json', recursive=True)[0]).read_text())['results']
  for task, metrics in hf['metrics'].items():
    for name, value in metrics.items():
      assert results[task][name] == pytest.approx(value, rel=TOLERANCE), (task, name)


def test_bad_arguments_are_one_sentence(tmp_path):
  with pytest.raises(ConfigError, match='No workdir given'):
    nopejax_lm_eval.NopeJaxLM()
  with pytest.raises(ConfigError, match='not a nopejax workdir'):
    nopejax_lm_eval.NopeJaxLM(workdir=str(tmp_path))


def test_bucket_length():
  assert [nopejax_lm_eval.bucket_length(n, 100) for n in (1, 16, 17, 33, 64, 65, 100)] == [16, 16, 32, 64, 64, 100, 100]
