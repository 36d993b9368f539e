import json
import os
import struct

import numpy as np
import pytest

from conftest import small_config
from nopejax import metrics, model


def test_writer_appends_jsonl_and_tensorboard_events(tmp_path):
  writer = metrics.Writer(str(tmp_path))
  writer.write(1, {'loss': np.float32(2.5), 'learning_rate': 0.1})
  writer.write(2, {'loss': 2.0, 'learning_rate': 0.2, 'eval_loss': 2.2})
  writer.close()
  with open(tmp_path / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  assert records == [{'step': 1, 'loss': 2.5, 'learning_rate': 0.1},
                     {'step': 2, 'loss': 2.0, 'learning_rate': 0.2, 'eval_loss': 2.2}]
  events = os.listdir(tmp_path / 'tensorboard')
  assert len(events) == 1 and os.path.getsize(tmp_path / 'tensorboard' / events[0]) > 100


def test_throughput_reports_tokens_per_second_and_mfu(monkeypatch):
  cfg = small_config()  # 8 x 16 tokens per step.
  clock = iter([100.0, 102.0, 103.0])
  monkeypatch.setattr(metrics.time, 'perf_counter', lambda: next(clock))
  throughput = metrics.Throughput(cfg, num_devices=8, peak_per_device=1e9)
  assert throughput.report(1) == {}  # Starts the clock after the first (compiling) step.
  throughput.exclude(1.0)  # An evaluation's second is not training time.
  report = throughput.report(3)
  assert report['sec_per_step'] == pytest.approx(0.5)
  assert report['tokens_per_sec'] == pytest.approx(128 / 0.5)
  assert report['mfu'] == pytest.approx(256 * model.flops_per_token(cfg) / 8e9)


def test_peak_flops_from_config_or_table_and_unknown_otherwise():
  cfg = small_config()
  assert metrics.peak_flops_per_device(cfg) == 1e9  # Configured.
  cfg.train.peak_flops_per_device = 0.0
  assert metrics.peak_flops_per_device(cfg) is None  # CPU: no data-sheet peak, so MFU is unknown.
  assert metrics.peak_flops_of('TPU v5 lite') == 197e12 and metrics.peak_flops_of('TPU v5') == 459e12
  assert metrics.peak_flops_of('NVIDIA H100 PCIe') == 756e12 and metrics.peak_flops_of('NVIDIA H100 80GB HBM3') == 989e12
  throughput = metrics.Throughput(cfg, num_devices=8, peak_per_device=None)
  throughput.report(1)
  report = throughput.report(2)
  assert 'mfu' not in report
  assert 'MFU unknown' in metrics.log_line(2, 10, {'loss': 2.0, 'learning_rate': 1e-3, **report})


def test_search_flops_count_no_weight_gradients():
  cfg = small_config()
  pretrain = model.flops_per_token(cfg)
  cfg.train.trainable = 'temperature'
  m = cfg.model
  weights = m.num_layers * (2 * m.embed_dim * m.embed_dim + 2 * m.embed_dim * m.num_kv_heads * 16 + 3 * m.embed_dim * m.mlp_dim) \
      + m.embed_dim * m.vocab_size
  assert pretrain - model.flops_per_token(cfg) == 2 * weights


def test_log_line_has_eta():
  line = metrics.log_line(10, 110, {'loss': 2.0, 'learning_rate': 1e-3, 'tokens_per_sec': 5000.0, 'mfu': 0.25,
                             'sec_per_step': 2.0})
  assert line == 'step 10/110 | loss 2.0000 | lr 0.001 | tokens/s 5,000 | MFU 25.00% | ETA 0:03:20'


def test_writer_on_an_object_store_rewrites_whole_files(gcs):
  # GCS objects cannot be appended to: each flush writes the whole file again, and a restart keeps
  # what the file already held.
  for step in (1, 2):
    writer = metrics.Writer('gs://bucket/run', first_step=step)
    writer.write(step, {'loss': float(step)})
    writer.close()
  stored = gcs.objects()
  assert stored['bucket/run/metrics.jsonl'].decode().splitlines() == ['{"step": 1, "loss": 1.0}', '{"step": 2, "loss": 2.0}']
  events = [name for name in stored if name.startswith('bucket/run/tensorboard/events.out.tfevents')]
  assert events and all(len(stored[name]) > 50 for name in events)


def event_steps(directory):
  """(tag, step) of every scalar in the TensorBoard event files of `directory`."""
  from tensorboardX.proto import event_pb2
  found = []
  for name in sorted(os.listdir(directory)):
    data, i = (directory / name).read_bytes(), 0
    while i < len(data):
      (length,) = struct.unpack('<Q', data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
      found += [(value.tag, event.step) for value in event.summary.value]
      i += 16 + length
  return found


def test_a_restart_drops_what_was_logged_after_its_checkpoint(tmp_path):
  writer = metrics.Writer(str(tmp_path))
  for step in range(1, 6):
    writer.write(step, {'loss': float(step)})
  writer.close()
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 6, "lo')  # A line cut short by kill -9.
  writer = metrics.Writer(str(tmp_path), first_step=4)  # Resumed from the checkpoint of step 3.
  for step in range(4, 7):
    writer.write(step, {'loss': 10.0 + step})
  writer.close()
  with open(tmp_path / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  assert [(r['step'], r['loss']) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0), (6, 16.0)]
  assert sorted(event_steps(tmp_path / 'tensorboard')) == [('loss', step) for step in range(1, 7)]
