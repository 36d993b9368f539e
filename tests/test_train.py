"""The command line: exit codes and one-sentence errors (each run is a fresh process)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(*args):
  return subprocess.run([sys.executable, '-m', 'nopejax.train', *args], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ), timeout=300)


@pytest.mark.parametrize('args, message', [
    (['--config.train.stepz=5'], 'error: Unknown config key train.stepz; every key is declared in configs/base.py'),
    (['--config.mesh.data=3'], 'error: mesh.data=3 mesh.fsdp=1 mesh.tensor=1 uses 3 devices but 8 are present'),
    (['--config.model.num_heads=3'], 'error: model.num_heads=3 does not divide model.embed_dim=128; change model.num_heads'),
    (['--config.model.num_kv_heads=3'], 'error: model.num_kv_heads=3 does not divide model.num_heads=4'),
    (['--config.train.steps=many'], "error: flag --config.train.steps=many: invalid literal for int()"),
])
def test_bad_input_exits_2_with_one_sentence(tmp_path, args, message):
  result = train('--config', 'configs/tiny.py', '--workdir', str(tmp_path / 'run'), *args)
  assert result.returncode == 2
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and errors[0].startswith(message), result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  assert not os.path.exists(tmp_path / 'run')


def test_missing_config_file_exits_2(tmp_path):
  result = train('--config', 'configs/nothing.py', '--workdir', str(tmp_path))
  assert result.returncode == 2 and 'error: Cannot load the config file configs/nothing.py' in result.stderr


def test_dry_run_of_the_1b_config():
  result = train('--config', 'configs/1b.py', '--dry_run')
  assert result.returncode == 0, result.stderr[-2000:]
  assert "mesh: {'data': 1, 'fsdp': 8, 'tensor': 1} (8 devices)" in result.stdout
  assert 'parameters: 1,100,048,384 + 704 temperatures' in result.stdout
  assert 'bytes per device: params 550,349,568' in result.stdout
