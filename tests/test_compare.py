import json
import os

from conftest import small_config
from nopejax import compare, evaluate, loop


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
