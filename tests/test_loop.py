import json
import os
import shutil
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nopejax
from conftest import damage, small_config, tree_digest
from nopejax import config, data, loop, optim
from nopejax.config import ConfigError


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def losses(workdir, first, last):
  by_step = {m['step']: m['loss'] for m in read_metrics(workdir)}
  return [by_step[s] for s in range(first, last + 1)]


@pytest.fixture
def full_run(small_run):
  cfg, workdir = small_run
  return cfg.copy_and_resolve_references(), workdir  # Tests may change their copy.


def test_run_writes_metrics_config_checkpoints_and_tensorboard(full_run):
  cfg, workdir = full_run
  records = read_metrics(workdir)
  assert [r['step'] for r in records] == list(range(1, 41))
  for r in records[1:]:
    assert {'loss', 'learning_rate', 'tokens_per_sec', 'mfu'} <= set(r)
    assert r['tokens_per_sec'] > 0 and 0 < r['mfu']
  assert {r['step'] for r in records if 'eval_loss' in r} == {20, 40}
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['train']['steps'] == 40
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['20', '30', '40']  # keep_checkpoints=3
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(os.path.join(workdir, 'tensorboard')))


def test_stopped_and_resumed_run_logs_the_same_losses(full_run, tfds_dir, tmp_path):
  cfg, full_dir = full_run
  workdir = str(tmp_path)
  cfg = small_config(tfds_dir)
  cfg.train.eval_every = 20
  cfg.train.stop_after = 20
  loop.run(cfg, workdir)
  assert max(m['step'] for m in read_metrics(workdir)) == 20
  cfg.train.stop_after = 0
  loop.run(cfg, workdir)  # Resumes from the step-20 checkpoint, data position included.
  assert losses(workdir, 21, 40) == losses(full_dir, 21, 40)
  # The learning rate schedule spans train.steps in both.
  assert read_metrics(workdir)[-1]['learning_rate'] == read_metrics(full_dir)[-1]['learning_rate']


def test_loss_falls_on_the_bundled_corpus(full_run):
  _, workdir = full_run
  first, last = losses(workdir, 1, 5), losses(workdir, 36, 40)
  assert np.mean(first) > np.log(256) - 0.2  # Starts near uniform over bytes (ln 256 = 5.55).
  assert np.mean(last) < np.mean(first) - 2.0


def test_load_returns_the_trained_model(full_run):
  cfg, workdir = full_run
  model, loaded_cfg = nopejax.load(workdir)
  assert loaded_cfg.to_dict() == cfg.to_dict()
  logits = model(jnp.zeros((2, 16), jnp.int32))
  assert logits.shape == (2, 16, 256) and logits.dtype == jnp.float32
  # The trained model predicts bytes far better than an untrained one would (uniform ~ ln 256).
  text = b'import os\nimport sys\n\n\ndef main():\n    return 0\n'
  tokens = jnp.array([list(text)], jnp.int32)
  loss = -jax.nn.log_softmax(model(tokens))[0, jnp.arange(tokens.shape[1] - 1), tokens[0, 1:]].mean()
  assert loss < 3.5


def test_workdir_of_another_model_shape_is_refused_and_left_untouched(full_run, tfds_dir):
  _, workdir = full_run
  before = tree_digest(workdir)
  cfg = small_config(tfds_dir)
  cfg.model.num_layers = 3
  with pytest.raises(ConfigError, match=r'model.num_layers=2 but the config asks for 3; set --config.model.num_layers=2'):
    loop.run(cfg, workdir)
  assert tree_digest(workdir) == before


def test_dry_run_sizes_the_1b_model_without_memory():
  report = loop.dry_run(config.from_file('configs/1b.py'))
  assert report['mesh'] == {'data': 1, 'fsdp': 8, 'tensor': 1}
  assert report['params'] == 1_100_048_384 and report['temperatures'] == 704
  # Matrices split 8 ways over fsdp, norms and temperatures replicated, float32.
  assert report['param_bytes_per_device'] == (1_100_048_384 - 45 * 2048) * 4 // 8 + (45 * 2048 + 704) * 4
  # Adam moments of the weights (temperatures are frozen: none for them) plus two int32 step counters
  # and the skipped updates' counts (two int32, one bool).
  assert report["optimizer_bytes_per_device"] == 2 * ((1_100_048_384 - 45 * 2048) * 4 // 8 + 45 * 2048 * 4) + 17


def test_sigterm_finishes_the_step_saves_and_the_resumed_run_matches_logging_each_step_once(full_run, tfds_dir, tmp_path, monkeypatch):
  cfg, full_dir = full_run
  workdir = str(tmp_path)
  cfg = small_config(tfds_dir)
  cfg.train.eval_every = 20
  batches_made = []
  real_global_batch = data.global_batch

  def global_batch_then_sigterm(*args):
    batches_made.append(1)
    if len(batches_made) == 7:
      os.kill(os.getpid(), signal.SIGTERM)  # A real signal, as a scheduler sends it, during step 7.
    return real_global_batch(*args)

  monkeypatch.setattr(data, 'global_batch', global_batch_then_sigterm)
  logged = loop.run(cfg, workdir)
  assert logged['stopped_at'] == 7 and logged['step'] == 7
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # The run's handler is gone again.
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['7']
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:  # As if also killed at step 9, after checkpoint 7.
    f.writelines(json.dumps({'step': s, 'loss': 0.0}) + '\n' for s in (8, 9))
  monkeypatch.setattr(data, 'global_batch', real_global_batch)
  cfg.train.peak_flops_per_device = 2e9  # A changed config: kept beside the first one.
  loop.run(cfg, workdir)
  assert [m['step'] for m in read_metrics(workdir)] == list(range(1, 41))  # Each step once.
  assert losses(workdir, 8, 40) == losses(full_dir, 8, 40)  # Same process: bit for bit.
  with open(os.path.join(workdir, 'config_history.jsonl')) as f:
    history = [json.loads(line) for line in f]
  assert [(h['start_step'], h['config']['train']['peak_flops_per_device']) for h in history] == [(0, 1e9), (7, 2e9)]


def poison_batch(monkeypatch, at_calls):
  """data.global_batch whose loss mask is NaN on the given calls (1-based): a bad batch that makes
  that step's loss and gradient non-finite."""
  real_global_batch = data.global_batch
  calls = []

  def global_batch(local, *args):
    calls.append(1)
    if len(calls) in at_calls:
      local = dict(local, loss_mask=np.full_like(local['loss_mask'], np.nan))
    return real_global_batch(local, *args)

  monkeypatch.setattr(data, 'global_batch', global_batch)


def test_a_non_finite_update_is_never_applied_or_saved_and_stops_the_run(tfds_dir, tmp_path, monkeypatch):
  cfg = small_config(tfds_dir)
  cfg.train.checkpoint_every = 5
  poison_batch(monkeypatch, {7})
  with pytest.raises(FloatingPointError, match=r'Step 7 had a non-finite loss \(nan\) or gradient norm \(nan\), so its '
                     r'update was not applied and nothing after step 5 was saved \(last good checkpoint: .*/checkpoints/5\);'
                     r' lower train.learning_rate or check the data, or set train.skip_nonfinite=N'):
    loop.run(cfg, str(tmp_path))
  assert os.listdir(tmp_path / 'checkpoints') == ['5'] and not os.path.exists(tmp_path / 'lock.json')
  model, _ = nopejax.load(str(tmp_path))
  assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(nnx.state(model)))


def test_skip_nonfinite_skips_bad_updates_counts_them_and_stops_after_n_in_a_row(full_run, tfds_dir, tmp_path, monkeypatch):
  _, full_dir = full_run
  cfg = small_config(tfds_dir)
  cfg.train.skip_nonfinite = 2
  poison_batch(monkeypatch, {3, 4, 9, 10, 11})
  with pytest.raises(FloatingPointError, match=r'Step 11 had a non-finite loss \(nan\) or gradient norm \(nan\) \(3 in a row\)'
                     r', so its update was not applied and nothing after step 10 was saved'):
    loop.run(cfg, str(tmp_path))
  records = {m['step']: m for m in read_metrics(tmp_path)}
  assert [records[s]['skipped_updates'] for s in (3, 4, 5, 9, 10)] == [1, 2, 2, 3, 4]
  assert np.isnan(records[3]['loss']) and np.isfinite(records[5]['loss'])
  # Skipped steps leave the state alone: step 5 sees the weights of step 2, unlike the uninterrupted run.
  assert records[2]['loss'] == losses(full_dir, 2, 2)[0] and records[5]['loss'] != losses(full_dir, 5, 5)[0]
  assert os.listdir(tmp_path / 'checkpoints') == ['10']  # Two skips in a row are allowed: 10 was saved.


def test_skipped_updates_and_the_applied_learning_rate_go_on_from_the_checkpoint(tfds_dir, tmp_path, monkeypatch):
  cfg = small_config(tfds_dir)
  cfg.train.skip_nonfinite, cfg.train.steps, cfg.train.stop_after, cfg.train.checkpoint_every = 1, 8, 4, 4
  poison_batch(monkeypatch, {2})
  loop.run(cfg, str(tmp_path))
  cfg.train.stop_after = 0
  loop.run(cfg, str(tmp_path))  # Resumes from step 4, in a fresh loop.
  records = {m['step']: m for m in read_metrics(tmp_path)}
  assert [records[s]['skipped_updates'] for s in range(1, 9)] == [0] + [1] * 7
  # Step s applies the schedule at the updates applied before it: s - 1, less the one skipped after step 1.
  schedule = optim.learning_rate_schedule(cfg)
  np.testing.assert_allclose([records[s]['learning_rate'] for s in range(1, 9)],
                             [float(schedule(min(s - 1, 1) + max(s - 3, 0))) for s in range(1, 9)], rtol=1e-6)


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_step(full_run, tmp_path, caplog):
  cfg, full_dir = full_run
  workdir = str(tmp_path / 'copy')
  shutil.copytree(full_dir, workdir)
  damage(os.path.join(workdir, 'checkpoints', '40'))
  os.makedirs(os.path.join(workdir, 'checkpoints', '50.orbax-checkpoint-tmp-1700000000'))  # A save cut short.
  loop.run(cfg, workdir)
  assert 'checkpoints/40 is damaged' in caplog.text
  assert 'Resuming from step 30 instead; the damaged step is kept as' in caplog.text
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['20', '30', '40', '40.damaged']
  assert [m['step'] for m in read_metrics(workdir)] == list(range(1, 41))  # 31-40 once, trained again.
  assert losses(workdir, 31, 40) == losses(full_dir, 31, 40)


def test_restores_leave_the_unraisable_hook_as_they_found_it(full_run, tmp_path, monkeypatch):
  _, full_dir = full_run
  workdir = str(tmp_path / 'copy')
  shutil.copytree(full_dir, workdir)
  for step in ('20', '30', '40'):
    damage(os.path.join(workdir, 'checkpoints', step))
  before = sys.unraisablehook
  nopejax.load(full_dir)
  assert sys.unraisablehook is before
  monkeypatch.setattr('nopejax.checkpoint.io.ECHO_GRACE_S', 0.2)
  with pytest.raises(ConfigError, match='damaged'):
    nopejax.load(workdir)
  # The failed reads' late callbacks are still dropped for a moment; then the hook is back.
  for _ in range(50):
    if sys.unraisablehook is before:
      break
    time.sleep(0.1)
  assert sys.unraisablehook is before


def test_when_no_checkpoint_reads_back_the_run_stops_in_one_sentence_and_renames_nothing(full_run, tmp_path):
  cfg, full_dir = full_run
  workdir = str(tmp_path / 'copy')
  shutil.copytree(full_dir, workdir)
  for step in ('20', '30', '40'):
    damage(os.path.join(workdir, 'checkpoints', step))
  before = tree_digest(workdir)
  with pytest.raises(ConfigError, match=r'checkpoints/40 is damaged .*; delete that step directory'):
    loop.run(cfg, workdir)
  assert tree_digest(workdir) == before
