"""launch/tpu.sh and launch/gpu.sh: the commands they print with --dry-run are the ones they run."""
import os
import shlex
import subprocess

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
                            env=dict(env, **env_values), timeout=60)
    recorded = [shlex.split(line) for line in calls.read_text().splitlines()] if calls.exists() else []
    calls.unlink(missing_ok=True)
    return result, recorded

  return launch


def printed_commands(result):
  return [shlex.split(line) for line in result.stdout.splitlines()]


def test_tpu_up_creates_installs_trains_on_all_workers_and_follows_worker_0(fake_tools):
  result, ran = fake_tools('tpu.sh', 'up', '--dry-run', '--name', 'nope-1b', '--zone', 'us-east5-a',
                           '--type', 'v5litepod-256', '--', *TRAIN_ARGS)
  assert result.returncode == 0, result.stderr
  assert ran == []  # A dry run runs nothing.
  create, install, train, logs = printed_commands(result)
  assert create == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'nope-1b', '--node-id', 'nope-1b',
                    '--zone', 'us-east5-a', '--accelerator-type', 'v5litepod-256', '--runtime-version',
                    'v2-alpha-tpuv5-lite']
  ssh = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'nope-1b', '--zone', 'us-east5-a']
  assert install[:9] == ssh + ['--worker=all'] and install[9] == '--command'
  assert "pip install -q -r requirements.txt 'jax[tpu]==0.10.2'" in install[10]
  assert train[:10] == ssh + ['--worker=all', '--command']
  remote = shlex.split(train[10])
  start = remote.index('nopejax.train') + 1
  assert remote[start:start + len(TRAIN_ARGS)] == TRAIN_ARGS  # The same command on every worker, quoting intact.
  assert logs == ssh + ['--worker=0', '--command', 'tail -n +1 -F nopejax/train.log']

  # Without --dry-run the very same commands run (gcloud's stand-in says the slice is ACTIVE).
  result, ran = fake_tools('tpu.sh', 'up', '--name', 'nope-1b', '--zone', 'us-east5-a', '--type', 'v5litepod-256',
                           '--', *TRAIN_ARGS)
  assert result.returncode == 0, result.stderr
  assert [c for c in ran if 'describe' not in c] == [create, install, train, logs]


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
