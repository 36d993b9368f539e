import json
import os

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


def test_peak_flops_from_config_table_or_measurement(monkeypatch):
  cfg = small_config()
  assert metrics.peak_flops_per_device(cfg) == 1e9  # Configured.
  cfg.train.peak_flops_per_device = 0.0
  monkeypatch.setattr(metrics, 'measure_matmul_flops', lambda dtype: 8e11)
  assert metrics.peak_flops_per_device(cfg) == 1e11  # CPU: the host's measured peak shared by 8 devices.


def test_log_line_has_eta():
  line = metrics.log_line(10, 110, {'loss': 2.0, 'learning_rate': 1e-3, 'tokens_per_sec': 5000.0, 'mfu': 0.25,
                             'sec_per_step': 2.0})
  assert line == 'step 10/110 | loss 2.0000 | lr 0.001 | tokens/s 5,000 | MFU 25.00% | ETA 0:03:20'


def test_writer_on_an_object_store_rewrites_whole_files(gcs):
  # GCS objects cannot be appended to: each flush writes the whole file again, and a restart keeps
  # what the file already held.
  for step in (1, 2):
    writer = metrics.Writer('gs://bucket/run')
    writer.write(step, {'loss': float(step)})
    writer.close()
  stored = gcs.objects()
  assert stored['bucket/run/metrics.jsonl'].decode().splitlines() == ['{"step": 1, "loss": 1.0}', '{"step": 2, "loss": 2.0}']
  events = [name for name in stored if name.startswith('bucket/run/tensorboard/events.out.tfevents')]
  assert events and all(len(stored[name]) > 50 for name in events)
