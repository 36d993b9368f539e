"""Throughput and logging: FLOPs, MFU, the progress line, metrics.jsonl and TensorBoard events."""
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from nopejax import paths
from nopejax.model import flops_per_token

# Dense peak FLOP/s per device (bf16) by jax device_kind prefix, from the vendors' data sheets.
PEAK_FLOPS = {
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v5': 459e12,
    'TPU v6 lite': 918e12,
    'TPU v6e': 918e12,
    'NVIDIA H100': 989e12,
    'NVIDIA H200': 989e12,
    'NVIDIA A100': 312e12,
}


def measure_matmul_flops(dtype, size=2048, repeats=5) -> float:
  """Best FLOP/s of a square matmul on the first device: the practical peak where no data sheet applies."""
  x = jnp.ones((size, size), dtype, device=jax.devices()[0])
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best


def peak_flops_per_device(cfg) -> float:
  if cfg.train.peak_flops_per_device:
    return cfg.train.peak_flops_per_device
  kind = jax.devices()[0].device_kind
  for prefix, flops in PEAK_FLOPS.items():
    if kind.startswith(prefix):
      return flops
  # CPU (or unknown): simulated devices share one host, so each gets its share of the measured peak.
  return measure_matmul_flops(jnp.dtype(cfg.model.dtype)) / jax.local_device_count()


def format_duration(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class AppendFile:
  """A file that grows: appended to in place on local disk; on an object store (gs://), where
  objects cannot be appended to, kept in memory and rewritten whole at each flush."""

  def __init__(self, path):
    self.path = epath.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if paths.is_url(self.path):
      self.contents = bytearray(self.path.read_bytes() if self.path.exists() else b'')
      self.local = None
    else:
      self.local = self.path.open('ab')

  def write(self, data: bytes) -> None:
    if self.local:
      self.local.write(data)
    else:
      self.contents += data

  def flush(self) -> None:
    if self.local:
      self.local.flush()
    else:
      self.path.write_bytes(bytes(self.contents))

  def close(self) -> None:
    self.flush()
    if self.local:
      self.local.close()


class _AppendFileFactory:
  """tensorboardX's hook for event files under a URL (its own gs:// writer needs google-cloud-storage)."""

  def open(self, path):
    return AppendFile(path)

  def directory_check(self, path):
    pass  # AppendFile creates the directory; object stores have none.


def _url_event_files() -> None:
  from tensorboardX import record_writer
  for scheme in ('gs', 's3', 'az', 'hf'):
    record_writer.register_writer_factory(scheme, _AppendFileFactory())


class Writer:
  """Writes each logged step to metrics.jsonl and TensorBoard in `workdir` (a path or URL); only
  process 0 writes."""

  def __init__(self, workdir):
    self.active = jax.process_index() == 0
    if self.active:
      from tensorboardX import SummaryWriter  # Writes TensorBoard event files without tensorflow.
      _url_event_files()
      workdir = paths.resolve(workdir)
      self.jsonl = AppendFile(workdir / 'metrics.jsonl')
      self.tensorboard = SummaryWriter(os.fspath(workdir / 'tensorboard'))

  def write(self, step: int, values: dict) -> None:
    if not self.active:
      return
    values = {k: float(v) if isinstance(v, (np.floating, np.integer, jax.Array)) else v for k, v in values.items()}
    self.jsonl.write((json.dumps({'step': step, **values}) + '\n').encode())
    self.jsonl.flush()
    for key, value in values.items():
      if isinstance(value, (int, float)):
        self.tensorboard.add_scalar(key, value, step)
    self.tensorboard.flush()

  def close(self) -> None:
    if self.active:
      self.jsonl.close()
      self.tensorboard.close()


class Throughput:
  """Tokens/s and MFU over the steps since the last report, leaving out evaluation time."""

  def __init__(self, cfg, num_devices, peak_per_device):
    self.tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    self.flops_per_token = flops_per_token(cfg)
    self.peak = peak_per_device * num_devices
    self.start_time = self.start_step = None
    self.excluded = 0.0

  def exclude(self, seconds: float) -> None:
    self.excluded += seconds

  def report(self, step: int) -> dict:
    """Throughput since the previous call; the first call (compilation included) only starts the clock."""
    now = time.perf_counter()
    if self.start_step is None or step == self.start_step:
      self.start_time, self.start_step, self.excluded = now, step, 0.0
      return {}
    seconds = (now - self.start_time - self.excluded) / (step - self.start_step)
    self.start_time, self.start_step, self.excluded = now, step, 0.0
    tokens_per_sec = self.tokens_per_step / seconds
    return {'tokens_per_sec': tokens_per_sec, 'mfu': tokens_per_sec * self.flops_per_token / self.peak,
            'sec_per_step': seconds}


def log_line(step, total_steps, values) -> str:
  parts = [f'step {step}/{total_steps}', f'loss {values["loss"]:.4f}']
  if 'eval_loss' in values:
    parts.append(f'eval_loss {values["eval_loss"]:.4f}')
  parts.append(f'lr {values["learning_rate"]:.3g}')
  if 'tokens_per_sec' in values:
    parts += [f'tokens/s {values["tokens_per_sec"]:,.0f}', f'MFU {100 * values["mfu"]:.2f}%',
              f'ETA {format_duration(values["sec_per_step"] * (total_steps - step))}']
  line = ' | '.join(parts)
  logging.info(line)
  return line
