import json
import os
import pathlib
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


def test_writer_on_an_object_store_uploads_each_flush_alone_and_a_restart_rewrites_only_its_tail(gcs, monkeypatch):
  # GCS objects cannot be appended to: each flush uploads what is new as its own object, so the bytes
  # per flush stay flat however long the file grows (rewriting whole files would grow them linearly).
  uploads = []
  real_put = gcs._put
  monkeypatch.setattr(gcs, '_put', lambda name, data, *args: uploads.append((name, len(data))) or real_put(name, data, *args))
  writer = metrics.Writer('gs://bucket/run')
  per_flush = []
  for step in range(10, 70):
    before = len(uploads)
    writer.write(step, {'loss': 1.0})
    per_flush.append(sum(n for name, n in uploads[before:] if '/metrics.jsonl' in name))
  writer.close()
  assert per_flush == [len('{"step": 10, "loss": 1.0}\n')] * 60
  assert metrics.read_metrics('gs://bucket/run') == [{'step': step, 'loss': 1.0} for step in range(10, 70)]
  # TensorBoard's flushes come from its writer thread: each event file part is uploaded once, never again.
  event_uploads = [(name, n) for name, n in uploads if '/tensorboard/' in name]
  stored = gcs.objects()
  assert len(event_uploads) > 1 and len({name for name, _ in event_uploads}) == len(event_uploads)
  assert sum(n for _, n in event_uploads) == sum(len(data) for name, data in stored.items() if '/tensorboard/' in name)
  uploads.clear()
  writer = metrics.Writer('gs://bucket/run', first_step=60)  # Resumed from the checkpoint of step 59.
  assert [name for name, _ in uploads if '/metrics.jsonl' in name] == []  # Steps 60-69's parts deleted, no rewrite.
  writer.write(60, {'loss': 2.0})
  writer.close()
  assert [(r['step'], r['loss']) for r in metrics.read_metrics('gs://bucket/run')][-2:] == [(59, 1.0), (60, 2.0)]
  names = [name for name in gcs.objects() if name.startswith('bucket/run/metrics.jsonl')]
  assert len(names) == 51 and all(name.startswith('bucket/run/metrics.jsonl.part') for name in names)


def event_steps(directory):
  """(tag, step) of every scalar TensorBoard shows from the event files of `directory`: read in the order
  of their names, a purge_step's START event hiding the earlier files' steps from that step on."""
  from tensorboardX.proto import event_pb2
  found = []
  for name in sorted(os.listdir(directory)):
    data, i = (directory / name).read_bytes(), 0
    while i < len(data):
      (length,) = struct.unpack('<Q', data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
      if event.session_log.status == event_pb2.SessionLog.START:
        found = [(tag, step) for tag, step in found if step < event.step]
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
  assert metrics.read_metrics(str(tmp_path)) == records
  assert sorted(event_steps(tmp_path / 'tensorboard')) == [('loss', step) for step in range(1, 7)]


def test_training_on_cpu_logs_no_mfu_and_the_docs_say_so():
  cfg = small_config()
  cfg.train.peak_flops_per_device = 0.0
  assert metrics.peak_flops_per_device(cfg) is None  # The CPU test devices: no peak, so no 'mfu'.
  docs = pathlib.Path(__file__).resolve().parent.parent / 'docs'
  scaling = ' '.join((docs / 'scaling.md').read_text().split())
  assert 'measured matmul peak shared' not in scaling
  assert 'On CPU and any other device without one, training measures no peak: `metrics.jsonl` has no `mfu`' in scaling
