import hashlib
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nopejax
from conftest import small_config
from nopejax import config, data, loop
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


def tree_digest(directory):
  digest = hashlib.sha256()
  for root, _, files in sorted(os.walk(directory)):
    for name in sorted(files):
      path = os.path.join(root, name)
      digest.update(path.encode())
      with open(path, 'rb') as f:
        digest.update(f.read())
  return digest.hexdigest()


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
  # Adam moments of the weights (temperatures are frozen: none for them) plus two int32 step counters.
  assert report["optimizer_bytes_per_device"] == 2 * ((1_100_048_384 - 45 * 2048) * 4 // 8 + 45 * 2048 * 4) + 8


def test_sigterm_finishes_the_step_saves_and_the_resumed_run_matches(full_run, tfds_dir, tmp_path, monkeypatch):
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
  monkeypatch.setattr(data, 'global_batch', real_global_batch)
  loop.run(cfg, workdir)
  assert [m['step'] for m in read_metrics(workdir)] == list(range(1, 41))
  assert losses(workdir, 8, 40) == losses(full_dir, 8, 40)  # Same process: bit for bit.
