"""kill -9 at random moments, restart, and compare with an uninterrupted run: every step's loss once,
and exactly the uninterrupted run's losses.

  .venv/bin/python bench/kill_resume.py                  # 10 kills, seed 0
  .venv/bin/python bench/kill_resume.py --kills 3 --seed 1

The test-sized model (2 layers, width 64, batch 8 x 16) on 8 simulated CPU devices, 120 steps,
checkpoints every 5 steps (asynchronous orbax saves). Half the kills land right after a checkpoint
step has been logged, while its save is being written; the others at a random step, at a random
moment of start-up, or a fraction of a second later. Too slow for the test suite (each restart
compiles again): about 20 s per start on 2 cores.
"""
import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, CHECKPOINT_EVERY = 120, 5


def flags(workdir, tfds_dir):
  values = {'model.num_layers': 2, 'model.embed_dim': 64, 'model.num_kv_heads': 2, 'model.mlp_dim': 128,
            'data.seq_len': 16, 'train.batch_size': 8, 'train.steps': STEPS, 'train.warmup_steps': 5,
            'train.log_every': 1, 'train.eval_every': 20, 'train.eval_batches': 2,
            'train.checkpoint_every': CHECKPOINT_EVERY, 'train.peak_flops_per_device': 1e9, 'data.tfds_dir': tfds_dir}
  return ['--config', 'configs/base.py', '--workdir', workdir] + [f'--config.{k}={v}' for k, v in values.items()]


def start(workdir, tfds_dir, log):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=8')
  with open(log, 'w') as out:
    process = subprocess.Popen([sys.executable, '-m', 'nopejax.train', *flags(workdir, tfds_dir)], cwd=ROOT,
                               env=env, stdout=out, stderr=subprocess.STDOUT)
  process.log = log
  return process


def last_step_logged(process) -> int:
  """The last step this start has logged (its own output, not an earlier start's metrics)."""
  with open(process.log) as f:
    steps = re.findall(r'step (\d+)/', f.read())
  return int(steps[-1]) if steps else 0


def complete_checkpoints(workdir):
  directory = os.path.join(workdir, 'checkpoints')
  return [int(name) for name in os.listdir(directory) if name.isdigit()] if os.path.isdir(directory) else []


def losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [(r['step'], r['loss']) for r in map(json.loads, f)]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--kills', type=int, default=10)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--tfds_dir', default=os.path.join(tempfile.gettempdir(), 'nopejax_bench_tfds'))
  args = parser.parse_args()
  rng = random.Random(args.seed)
  root = tempfile.mkdtemp(prefix='kill_resume_')
  reference, killed = os.path.join(root, 'reference'), os.path.join(root, 'killed')

  start(reference, args.tfds_dir, os.path.join(root, 'reference.log')).wait()
  kills = []
  for kind in (['save', 'step', 'startup', 'save', 'step'] * args.kills)[:args.kills]:
    done = max(complete_checkpoints(killed), default=0)  # Where the restart resumes.
    if done >= STEPS - CHECKPOINT_EVERY:
      break
    process, began = start(killed, args.tfds_dir, os.path.join(root, f'start{len(kills)}.log')), time.time()
    if kind == 'save':  # As soon as a checkpoint step is logged: its asynchronous save is being written.
      target, delay = (done // CHECKPOINT_EVERY + rng.randint(1, 3)) * CHECKPOINT_EVERY, 0.0
    elif kind == 'step':
      target, delay = rng.randint(done + 1, done + 15), rng.uniform(0, 0.3)
    else:  # During start-up: restore, compilation.
      target, delay = 0, rng.uniform(1, 12)
    while process.poll() is None and last_step_logged(process) < target:
      time.sleep(0.005)
    time.sleep(delay)
    if process.poll() is not None:
      print(f'{kind} kill: the run ended first')
      continue
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    last = last_step_logged(process)
    directory = os.path.join(killed, 'checkpoints')
    kills.append(last)
    print(f'kill {len(kills)} ({kind}): {time.time() - began:.1f} s after the start, last logged step {last}, '
          f'checkpoints {sorted(os.listdir(directory)) if os.path.isdir(directory) else []}', flush=True)
  result = start(killed, args.tfds_dir, os.path.join(root, 'last.log')).wait()
  got, want = losses(killed), losses(reference)
  steps = [step for step, _ in got]
  print(f'final start exit code {result}; steps logged {len(steps)} (each once: {len(steps) == len(set(steps))}, '
        f'all of 1-{STEPS}: {sorted(steps) == list(range(1, STEPS + 1))})')
  equal = sum(a == b for a, b in zip(got, want))
  print(f'losses equal to the uninterrupted run: {equal} of {len(want)}; largest difference '
        f'{max(abs(a[1] - b[1]) for a, b in zip(got, want)):.3g}')
  print(f'workdirs and log: {root}')
  sys.exit(0 if result == 0 and got == want else 1)


if __name__ == '__main__':
  main()
