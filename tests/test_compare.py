import json
import os

import pytest

from conftest import small_config
from nopejax import compare, config, evaluate, loop


def test_a_difference_counts_only_beyond_the_seed_spread():
  assert compare.verdict([10.0, 10.5, 11.0], [13.0, 13.2, 14.0]) == 'better'
  assert compare.verdict([13.0, 13.2, 14.0], [10.0, 10.5, 11.0]) == 'worse'
  # Means 1.0 apart but a range of 1.6 on one side: within the spread.
  assert compare.verdict([10.0, 10.4, 11.6], [11.5, 11.6, 11.7]) == 'within the seed spread'
  assert compare.verdict([10.0], [20.0]) == 'not comparable (fewer than 2 seeds)'


def test_run_pretrains_searches_and_evaluates_every_variant_then_resumes(monkeypatch, tmp_path):
  """With stubs for training and evaluation: what each piece receives, the table, and a second run doing nothing."""
  trained, evaluated = [], []

  def fake_run(cfg, workdir):
    trained.append((workdir, cfg))
    (tmp_path / 'done').mkdir(exist_ok=True)
    (tmp_path / 'done' / workdir.replace('/', '_')).write_text(str(cfg.train.steps))

  def fake_evaluate(workdir, overrides, out):
    evaluated.append((workdir, overrides, out))
    seed = int(workdir[-1])
    ppl = {'16': 10.0 + seed, '32': 20.0 + seed + (5.0 if 'rope_s' in workdir and not overrides.get('model.rope_scaling') else 0.0)}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'results.json'), 'w') as f:
      json.dump({'perplexity': ppl}, f)

  monkeypatch.setattr(loop, 'run', fake_run)
  monkeypatch.setattr(evaluate, 'evaluate', fake_evaluate)
  monkeypatch.setattr(compare, '_finished', lambda workdir, steps: (tmp_path / 'done' / workdir.replace('/', '_')).exists())
  cfg = small_config()
  out = tmp_path / 'out'
  summary = compare.run(cfg, str(out), seeds=2, steps=30)
  positions = [(c.model.position, c.train.seed, c.train.steps, c.train.trainable) for _, c in trained]
  assert positions == [piece for seed in (0, 1) for piece in (  # Seed by seed; the search after its base.
      ('nope', seed, 30, 'model'), ('rope', seed, 30, 'model'), ('alibi', seed, 30, 'model'),
      ('nope', seed, 200, 'temperature'))]
  search_cfg = trained[3][1]
  assert search_cfg.search.base == str(out / 'nope_s0') and search_cfg.data.seq_len == 4 * 16
  assert len(evaluated) == 2 * len(compare.variants(1.5, 16))
  yarn = next(o for w, o, _ in evaluated if o.get('model.rope_scaling') == 'yarn')
  assert yarn['model.rope_scaling_factor'] == 0.0 and yarn['model.original_length'] == 16
  assert yarn['eval.passkey_keys'] == 0  # fast evaluation
  assert summary['perplexity']['RoPE']['32'] == [25.0, 26.0]
  table = (out / 'compare.md').read_text()
  assert '| RoPE | 2 | 10.50 ± 0.71 | 25.50 ± 0.71 |' in table
  assert 'NoPE, searched c_h vs RoPE: better' in table
  assert 'NoPE, searched c_h vs ALiBi: within the seed spread' in table
  assert (out / 'compare.png').read_bytes()[:4] == b'\x89PNG'
  trained.clear(), evaluated.clear()
  compare.run(cfg, str(out), seeds=2, steps=30)
  assert trained == [] and evaluated == []  # Everything found on disk.


def test_an_evaluation_from_other_inputs_is_made_again_and_a_run_from_another_config_refused(monkeypatch, tmp_path):
  evaluated = []

  def fake_run(cfg, workdir):  # Writes what loop.run writes first, and marks the run finished.
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json(cfg))

  def fake_evaluate(workdir, overrides, out):
    evaluated.append((os.path.basename(out), overrides.get('model.temperature')))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'results.json'), 'w') as f:
      json.dump({'perplexity': {'16': 10.0}}, f)

  monkeypatch.setattr(loop, 'run', fake_run)
  monkeypatch.setattr(evaluate, 'evaluate', fake_evaluate)
  monkeypatch.setattr(compare, '_finished', lambda workdir, steps: os.path.exists(os.path.join(workdir, 'config.json')))
  cfg, out = small_config(), str(tmp_path / 'out')
  compare.run(cfg, out, seeds=1, steps=30, temperature=1.5)
  assert len(evaluated) == len(compare.variants(1.5, 16))
  evaluated.clear()
  compare.run(cfg, out, seeds=1, steps=30, temperature=2.0)
  assert evaluated == [('v1_s0', 2.0)]  # Only the row the temperature changes.
  evaluated.clear()
  compare.run(cfg, out, seeds=1, steps=30, temperature=2.0, fast=False)
  assert len(evaluated) == len(compare.variants(2.0, 16))  # Other eval.* keys: every row again.
  with pytest.raises(config.ConfigError, match=r'out/nope_s0 was made with train.steps=30 but this command asks for '
                     r'20; pass another --out, or delete .*nope_s0 to make it again'):
    compare.run(cfg, out, seeds=1, steps=20, temperature=2.0)


@pytest.mark.parametrize('args, message', [
    (['--config', 'configs/nothing.py'], 'error: Cannot load the config file configs/nothing.py; pass an existing file'),
    (['--config', '{broken}'], 'error: The config file {broken} fails at line 1 (SyntaxError: invalid syntax)'),
    (['--config', 'configs/tiny.py', '--out', 'README.md'], 'error: --out {root}/README.md is a file, not a directory'),
], ids=['missing', 'syntax_error', 'out_is_a_file'])
def test_bad_command_lines_are_one_sentence(tmp_path, args, message):
  import subprocess
  import sys
  (tmp_path / 'broken.py').write_text('def get_config(:\n')
  args = [a.replace('{broken}', str(tmp_path / 'broken.py')) for a in args]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, '-m', 'nopejax.compare', *args], cwd=root, capture_output=True, text=True,
                          timeout=120)
  message = message.replace('{broken}', str(tmp_path / 'broken.py')).replace('{root}', root)
  assert result.returncode == 2 and result.stderr.startswith(message), result.stderr[-2000:]
  assert 'Traceback' not in result.stderr


def test_a_config_naming_rope_layers_adds_the_hybrid_last(monkeypatch, tmp_path):
  """--config.model.position=rope --config.model.rope_layers=...: a fourth pretraining, the hybrid, and its row
  last (the other rows keep their evaluation directories); every other run is uniform."""
  trained, evaluated = [], []
  monkeypatch.setattr(loop, 'run', lambda cfg, workdir: trained.append((workdir, cfg)))
  monkeypatch.setattr(compare, '_finished', lambda workdir, steps: False)

  def fake_evaluate(workdir, overrides, out):
    evaluated.append((workdir, out))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'results.json'), 'w') as f:
      json.dump({'perplexity': {'16': 10.0}}, f)

  monkeypatch.setattr(evaluate, 'evaluate', fake_evaluate)
  cfg = small_config()
  cfg.model.position, cfg.model.rope_layers = 'rope', 'every:2'
  summary = compare.run(cfg, str(tmp_path), seeds=1, steps=30)
  made = {os.path.basename(w): (c.model.position, c.model.rope_layers) for w, c in trained}
  assert made == {'nope_s0': ('nope', ''), 'rope_s0': ('rope', ''), 'alibi_s0': ('alibi', ''),
                  'hybrid_s0': ('rope', 'every:2'), 'nope_search_s0': ('nope', '')}
  for _, c in trained:
    config.validate(c)
  rows = compare.variants(1.5, 16, 'every:2')
  assert rows[:-1] == compare.variants(1.5, 16) and rows[-1] == ('Hybrid RoPE/NoPE (every:2)', 'hybrid', {})
  assert evaluated[-1] == (str(tmp_path / 'hybrid_s0'), str(tmp_path / 'eval' / f'v{len(rows) - 1}_s0'))
  assert summary['perplexity']['Hybrid RoPE/NoPE (every:2)'] == {'16': [10.0]}
