"""Stop signals: SIGTERM or SIGINT makes a run save and stop at a step boundary, on every process alike."""
import os
import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils


class StopSignals:
  """SIGTERM (how Cloud TPU and most schedulers preempt) or SIGINT (Ctrl-C) asks the run to finish
  its current step, save and stop; a second one stops at once.

  One process: Python handlers note the signal. Several: jax's preemption service (started by
  jax.distributed.initialize) catches SIGTERM on any process and agrees with all of them on one
  step, so every process stops and saves at the same step; SIGINT is handed to it as SIGTERM.
  """

  def __init__(self):
    self.received = None
    self.previous = {}
    self.shared = jax.process_count() > 1

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # Only there can Python handle signals.
      for signum in (signal.SIGINT,) if self.shared else (signal.SIGTERM, signal.SIGINT):
        self.previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, handler in self.previous.items():
      signal.signal(signum, handler)

  def _handle(self, signum, frame):
    if self.received:
      self.__exit__()
      signal.raise_signal(signum)
      return
    self.received = signal.Signals(signum).name
    logging.warning('%s received: finishing this step, then saving and stopping (send it again to stop at once).',
                    self.received)
    if self.shared:
      os.kill(os.getpid(), signal.SIGTERM)  # To jax's preemption service, which tells every process.

  def requested(self, step: int) -> bool:
    """Whether to save and stop after `step`; with several processes, true at the same step on all."""
    if self.shared:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.received is not None
