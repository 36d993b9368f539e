"""Throughput and logging: FLOPs, MFU, the progress line, metrics.jsonl and TensorBoard events."""
import json
import os
import time

import jax
import numpy as np
from absl import logging
from etils import epath

from nopejax import paths
from nopejax.model import flops_per_token

# Dense bf16 peak FLOP/s per device by jax device_kind prefix, from the vendors' data sheets; the
# first matching prefix wins (so PCIe before the SXM default). TPU v4 and v5p count a chip (two
# cores, one megacore device).
PEAK_FLOPS = (
    ('TPU v4', 275e12),
    ('TPU v5 lite', 197e12),  # v5e.
    ('TPU v5e', 197e12),
    ('TPU v5p', 459e12),
    ('TPU v5', 459e12),  # v5p reports itself as 'TPU v5'.
    ('TPU v6 lite', 918e12),  # v6e (Trillium).
    ('TPU v6e', 918e12),
    ('NVIDIA A100', 312e12),  # SXM and PCIe alike.
    ('NVIDIA H100 PCIe', 756e12),
    ('NVIDIA H100', 989e12),  # SXM (e.g. 'NVIDIA H100 80GB HBM3').
    ('NVIDIA H200', 989e12),
    ('NVIDIA B200', 2250e12),
)


def peak_flops_of(device_kind: str):
  """The table's peak for a device kind, or None for a kind it does not know."""
  return next((flops for prefix, flops in PEAK_FLOPS if device_kind.startswith(prefix)), None)


def peak_flops_per_device(cfg):
  """train.peak_flops_per_device if set, else the table's; None (MFU unknown) for other devices."""
  if cfg.train.peak_flops_per_device:
    return cfg.train.peak_flops_per_device
  return peak_flops_of(jax.devices()[0].device_kind)


def format_duration(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class AppendFile:
  """A file that grows, append-only: appended to in place on local disk; on an object store
  (gs://), where objects cannot be appended to, each flush uploads only what was written since the
  last one, as a new object NAME.partN (`parts` lists them in order). A flush costs its own bytes,
  never the file's length."""

  def __init__(self, path):
    self.path = epath.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if paths.is_url(self.path):
      self.local, self.pending = None, bytearray()
      self.next_part = 1 + max((_part_number(p.name, self.path.name) for p in parts(self.path) if p != self.path),
                               default=-1)
    else:
      self.local = self.path.open('ab')

  def write(self, data: bytes) -> None:
    if self.local:
      self.local.write(data)
    else:
      self.pending += data

  def flush(self) -> None:
    if self.local:
      self.local.flush()
    elif self.pending:
      (self.path.parent / f'{self.path.name}.part{self.next_part:06d}').write_bytes(bytes(self.pending))
      self.pending, self.next_part = bytearray(), self.next_part + 1

  def close(self) -> None:
    self.flush()
    if self.local:
      self.local.close()


def _part_number(name: str, base: str):
  """N of an object named BASE.partN, else None."""
  number = name[len(base) + len('.part'):] if name.startswith(base + '.part') else ''
  return int(number) if number.isdigit() else None


def parts(path) -> list:
  """The pieces of a file AppendFile wrote, in order: the file itself if it exists, then its
  NAME.partN objects by N. Whoever reads such a file (metrics.jsonl) reads them all: read_bytes."""
  path = epath.Path(path)
  numbered = []
  if path.parent.is_dir():
    numbered = sorted((n, p.name) for p in path.parent.iterdir() if (n := _part_number(p.name, path.name)) is not None)
  return ([path] if path.exists() else []) + [path.parent / name for _, name in numbered]


def read_bytes(path) -> bytes:
  """The whole of a file AppendFile wrote (on an object store, its parts joined)."""
  return b''.join(part.read_bytes() for part in parts(path))


def read_metrics(workdir) -> list[dict]:
  """The records of WORKDIR/metrics.jsonl, in order (a line cut short by a kill left out)."""
  return [record for line in read_bytes(paths.resolve(workdir) / 'metrics.jsonl').decode().splitlines(keepends=True)
          if (record := _record(line)) is not None]


def _record(line: str):
  """A metrics.jsonl line's record, or None for a line cut short by a kill."""
  try:
    return json.loads(line) if line.endswith('\n') else None
  except ValueError:
    return None


class _AppendFileFactory:
  """tensorboardX's hook for event files under a URL (its own gs:// writer needs google-cloud-storage
  and uploads the whole file at each flush)."""

  def open(self, path):
    return AppendFile(path)

  def directory_check(self, path):
    pass  # AppendFile creates the directory; object stores have none.


def _url_event_files() -> None:
  from tensorboardX import record_writer
  for scheme in ('gs', 's3', 'az', 'hf'):
    record_writer.register_writer_factory(scheme, _AppendFileFactory())


def _drop_metrics_from(path, first_step: int) -> None:
  """metrics.jsonl (each of its parts) without the lines of steps >= first_step (or cut short by a
  kill); a part left empty is deleted. Only parts that hold such lines are written."""
  for part in parts(path):
    text = part.read_text()
    records = [(line, _record(line)) for line in text.splitlines(keepends=True)]
    kept = ''.join(line for line, record in records if record and record['step'] < first_step)
    if not kept and part != path:
      part.unlink()
    elif kept != text:
      part.write_text(kept)


class Writer:
  """Writes each logged step to metrics.jsonl and TensorBoard in `workdir` (a path or URL); only
  process 0 writes. A run that starts at `first_step` first drops what an earlier start logged
  from there on (steps after its last checkpoint, which this start trains again): from
  metrics.jsonl, and from TensorBoard's view through the new event file's purge_step. So every
  step is logged once whatever the restarts."""

  def __init__(self, workdir, first_step: int = 1):
    self.active = jax.process_index() == 0
    if self.active:
      from tensorboardX import SummaryWriter  # Writes TensorBoard event files without tensorflow.
      _url_event_files()
      workdir = paths.resolve(workdir)
      _drop_metrics_from(workdir / 'metrics.jsonl', first_step)
      self.jsonl = AppendFile(workdir / 'metrics.jsonl')
      # One event file per start (its name has the second it was made and, here, the first step).
      self.tensorboard = SummaryWriter(os.fspath(workdir / 'tensorboard'), filename_suffix=f'.from{first_step}',
                                       purge_step=first_step if first_step > 1 else None)

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
    self.peak = peak_per_device * num_devices if peak_per_device else None  # None: MFU unknown.
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
    report = {'tokens_per_sec': tokens_per_sec, 'sec_per_step': seconds}
    if self.peak:
      report['mfu'] = tokens_per_sec * self.flops_per_token / self.peak
    return report


def log_line(step, total_steps, values) -> str:
  parts = [f'step {step}/{total_steps}', f'loss {values["loss"]:.4f}']
  if 'eval_loss' in values:
    parts.append(f'eval_loss {values["eval_loss"]:.4f}')
  parts.append(f'lr {values["learning_rate"]:.3g}')
  if 'tokens_per_sec' in values:
    mfu = f'{100 * values["mfu"]:.2f}%' if 'mfu' in values else 'unknown (set train.peak_flops_per_device)'
    parts += [f'tokens/s {values["tokens_per_sec"]:,.0f}', f'MFU {mfu}',
              f'ETA {format_duration(values["sec_per_step"] * (total_steps - step))}']
  line = ' | '.join(parts)
  logging.info(line)
  return line
