"""launch/tpu.sh and launch/gpu.sh: the commands they print with --dry-run are the ones they run;
launch/colab.ipynb: every code cell runs headless, its install cell included."""
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_ARGS = ['--config', 'configs/1b.py', '--workdir', 'gs://bucket/runs/nope-1b',
              "--config.data.text_dir=gs://bucket/data/it's here"]


@pytest.fixture
def fake_tools(tmp_path):
  """gcloud and sbatch stand-ins on PATH that record each call (one line of shell-quoted arguments)."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  calls = tmp_path / 'calls'
  for tool, output in (('gcloud', 'ACTIVE'), ('sbatch', 'Submitted batch job 1')):
    (bin_dir / tool).write_text(
        f'#!/usr/bin/env bash\n'
        f'{{ printf "%q " {tool} "$@"; echo; }} >> {calls}\n'
        f'[[ {tool} != sbatch ]] || cat > {tmp_path}/batch_script\n'
        f'echo {output}\n')
    (bin_dir / tool).chmod(0o755)
  env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}')

  def launch(script, *args, **env_values):
    result = subprocess.run(['bash', f'launch/{script}', *args], cwd=ROOT, capture_output=True, text=True,
                            env=dict(env, TMPDIR=str(tmp_path), **env_values), timeout=60)
    recorded = [shlex.split(line) for line in calls.read_text().splitlines()] if calls.exists() else []
    calls.unlink(missing_ok=True)
    return result, recorded

  return launch


def printed_commands(result):
  return [shlex.split(line) for line in result.stdout.splitlines()]


def test_tpu_up_creates_installs_trains_on_all_workers_and_follows_worker_0(fake_tools, tmp_path):
  result, ran = fake_tools('tpu.sh', 'up', '--dry-run', '--name', 'nope-1b', '--zone', 'us-east5-a',
                           '--type', 'v5litepod-256', '--', *TRAIN_ARGS)
  assert result.returncode == 0, result.stderr
  assert ran == []  # A dry run runs nothing.
  create, pack, copy, install, train, logs = printed_commands(result)
  assert create == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'nope-1b', '--node-id', 'nope-1b',
                    '--zone', 'us-east5-a', '--accelerator-type', 'v5litepod-256', '--runtime-version',
                    'v2-alpha-tpuv5-lite']
  # NOPEJAX_REPO defaults to the checkout the script is in: its files go to every worker, installed with pip.
  archive = str(tmp_path / 'nopejax-nope-1b.tar.gz')
  assert pack[:2] == ['bash', '-c'] and pack[3:] == ['pack', ROOT, archive]
  assert copy == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', archive, 'nope-1b:nopejax.tar.gz', '--zone',
                  'us-east5-a', '--worker=all']
  ssh = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'nope-1b', '--zone', 'us-east5-a']
  assert install[:10] == ssh + ['--worker=all', '--command']
  assert 'tar -xzf nopejax.tar.gz -C nopejax' in install[10] and install[10].endswith("pip install -q -e '.[tpu,files]'")
  assert train[:10] == ssh + ['--worker=all', '--command']
  remote = shlex.split(train[10])
  start = remote.index('nopejax.train') + 1
  assert remote[start:start + len(TRAIN_ARGS)] == TRAIN_ARGS  # The same command on every worker, quoting intact.
  assert logs == ssh + ['--worker=0', '--command', 'tail -n +1 -F nopejax/train.log']

  # Without --dry-run the very same commands run (gcloud's stand-in says the slice is ACTIVE).
  result, ran = fake_tools('tpu.sh', 'up', '--name', 'nope-1b', '--zone', 'us-east5-a', '--type', 'v5litepod-256',
                           '--', *TRAIN_ARGS)
  assert result.returncode == 0, result.stderr
  assert [c for c in ran if 'describe' not in c] == [create, copy, install, train, logs]
  with tarfile.open(archive) as packed:  # The checkout's files, none of what git ignores.
    names = packed.getnames()
  assert {'pyproject.toml', 'nopejax/train.py', 'configs/1b.py', 'launch/tpu.sh'} <= set(names)
  assert not any(name.startswith(('.git/', '.venv', 'runs/')) or '__pycache__' in name for name in names)


def test_tpu_install_clones_a_git_url_on_the_workers(fake_tools):
  result, _ = fake_tools('tpu.sh', 'install', '--dry-run', '--name', 'n', '--zone', 'z', '--branch', 'dev',
                         NOPEJAX_REPO='https://example.com/me/nopejax.git')
  assert result.returncode == 0, result.stderr
  (install,) = printed_commands(result)
  assert ('git clone -q https://example.com/me/nopejax.git nopejax; } && git -C nopejax fetch -q origin dev '
          '&& git -C nopejax checkout -q dev && git -C nopejax pull -q --ff-only && cd nopejax') in install[10]
  result, ran = fake_tools('tpu.sh', 'install', '--name', 'n', '--zone', 'z', NOPEJAX_REPO='nopejax-copy')
  assert result.returncode == 2 and ran == []
  assert result.stderr.startswith('error: NOPEJAX_REPO=nopejax-copy is neither a folder here nor a git URL')


def test_tpu_stop_signals_every_worker_and_delete_removes_the_queued_resource(fake_tools):
  result, _ = fake_tools('tpu.sh', 'stop', '--dry-run', '--name', 'n', '--zone', 'z')
  assert printed_commands(result) == [['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'n', '--zone', 'z', '--worker=all',
                                       '--command', 'kill -TERM $(cat nopejax/train.pid)']]
  result, ran = fake_tools('tpu.sh', 'delete', '--name', 'n', '--zone', 'z', '--project', 'p')
  assert ran == [['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'n', '--zone', 'z', '--project', 'p',
                  '--force', '--quiet']]


@pytest.mark.parametrize('script, args, message', [
    ('tpu.sh', ['train', '--zone', 'z'], 'error: --name and --zone are required'),
    ('tpu.sh', ['train', '--name', 'n', '--zone', 'z'], 'error: pass the training flags after --'),
    ('tpu.sh', ['resize', '--name', 'n', '--zone', 'z'], 'error: unknown command resize'),
    ('gpu.sh', ['slurm', '--', '--config', 'configs/1b.py'], 'error: --nodes is required for slurm'),
    ('gpu.sh', ['node', '--', '--config', 'configs/1b.py'], 'error: set COORDINATOR (host:port of node 0)'),
])
def test_launch_errors_exit_2_with_one_sentence(fake_tools, script, args, message):
  result, ran = fake_tools(script, *args)
  assert result.returncode == 2 and result.stderr.startswith(message) and ran == []


def test_gpu_slurm_runs_one_process_per_gpu_on_every_node(fake_tools, tmp_path):
  result, ran = fake_tools('gpu.sh', 'slurm', '--dry-run', '--nodes', '2', '--partition', 'a100', '--', *TRAIN_ARGS)
  assert result.returncode == 0, result.stderr
  assert ran == []
  lines = result.stdout.splitlines()
  assert lines[0] == "sbatch <<'EOF'" and lines[-1] == 'EOF'
  script = lines[1:-1]
  for directive in ('--nodes=2', '--ntasks-per-node=8', '--gpus-per-node=8', '--partition=a100', '--signal=TERM@120'):
    assert f'#SBATCH {directive}' in script
  srun = shlex.split(script[-1])
  assert srun[:6] == ['exec', 'srun', '--kill-on-bad-exit=1', '.venv/bin/python', '-m', 'nopejax.train']
  assert srun[6:] == TRAIN_ARGS
  result, ran = fake_tools('gpu.sh', 'slurm', '--nodes', '2', '--partition', 'a100', '--', *TRAIN_ARGS)
  assert ran == [['sbatch']] and (tmp_path / 'batch_script').read_text().splitlines() == script


def test_gpu_node_joins_by_environment_variables(fake_tools):
  result, _ = fake_tools('gpu.sh', 'node', '--dry-run', '--', *TRAIN_ARGS,
                         COORDINATOR='node0:12345', NUM_NODES='2', NODE_RANK='1')
  assert printed_commands(result) == [['.venv/bin/python', '-m', 'nopejax.train', *TRAIN_ARGS,
                                       '--coordinator_address=node0:12345', '--num_processes=2', '--process_id=1']]


def notebook_code(path, before_ipython='', **assignments):
  """The notebook's code cells as one script, every line of them, top-level NAME = value assignments
  replaced (fewer steps), `before_ipython` put before the cell that imports IPython."""
  with open(path) as f:
    cells = [''.join(cell['source']) for cell in json.load(f)['cells'] if cell['cell_type'] == 'code']
  cells = [before_ipython + cell if 'from IPython' in cell else cell for cell in cells]
  source = '\n'.join(cells)
  for name, value in assignments.items():
    source, count = re.subn(rf'^{name} = .*$', f'{name} = {value!r}', source, flags=re.M)
    assert count == 1, name
  return source


# IPython (Colab's display) is no dependency of nopejax; headless, Image just checks the file.
# Put in only where the notebook imports it: treescope (under flax) would take it for the real one.
IPYTHON_STAND_IN = '''
import sys, types
try:
  import IPython.display
except ImportError:
  display = types.ModuleType('IPython.display')
  display.Image = lambda path: open(path, 'rb').read(8) == b'\\x89PNG\\r\\n\\x1a\\n' or sys.exit('not a PNG')
  sys.modules['IPython'] = types.ModuleType('IPython')
  sys.modules['IPython.display'] = display
'''


def test_colab_notebook_code_cells_run_headless(tfds_dir, small_run, tmp_path):
  """Every cell, from the install on: NOPEJAX_REPO is this checkout, so its editable install into this
  interpreter changes nothing; offline, without dependencies (installed already) or a build environment."""
  script = tmp_path / 'notebook.py'
  script.write_text(notebook_code(os.path.join(ROOT, 'launch', 'colab.ipynb'), IPYTHON_STAND_IN,
                                  NOPEJAX_REPO=ROOT, STEPS=20, SEARCH_STEPS=4))
  env = {key: value for key, value in os.environ.items() if key not in ('XLA_FLAGS', 'PYTHONPATH')}
  # PIP_NO_BUILD_ISOLATION reads inverted: 0 turns the isolated build environment off.
  env.update(TFDS_DATA_DIR=tfds_dir, JAX_PLATFORMS='cpu', PIP_NO_INDEX='1', PIP_NO_DEPS='1', PIP_NO_BUILD_ISOLATION='0')
  result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'CpuDevice(id=7)' in result.stdout and '(1, 25, 256)' in result.stdout  # 25 bytes of code in, logits out.
  with open(tmp_path / 'runs' / 'tiny_search' / 'temperatures.json') as f:
    assert len(json.load(f)['temperatures']) == 4
  assert sorted(os.listdir(tmp_path / 'runs' / 'tiny' / 'checkpoints')) == ['20']
