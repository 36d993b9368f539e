"""run(cfg, workdir): the training loop, for pretraining and for the temperature search alike."""
import contextlib
import json
import time

import jax
from absl import logging
from jax.experimental import multihost_utils

from nopejax import attention, checkpoint, config, data, metrics, model, optim, paths, search, sharding, step as step_lib


def _prepare_data(cfg) -> None:
  """Builds the tfds corpus once: process 0 first, so hosts sharing data.tfds_dir do not race."""
  if jax.process_index() == 0:
    data.prepare(cfg)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('nopejax data prepared')
    data.prepare(cfg)  # Finds process 0's copy on shared storage, or builds this host's own.


def _write_config(cfg, workdir, start_step: int) -> None:
  """config.json is the config of the latest start; config_history.jsonl keeps every start's."""
  if jax.process_index() == 0:
    workdir = paths.resolve(workdir)
    paths.write_text(workdir / 'config.json', config.to_json(cfg))
    history = metrics.AppendFile(workdir / 'config_history.jsonl')
    history.write((json.dumps({'start_step': start_step, 'time': time.strftime('%Y-%m-%d %H:%M:%S'),
                               'config': cfg.to_dict()}) + '\n').encode())
    history.close()


def run(cfg, workdir) -> dict:
  """Trains in `workdir` until train.steps (or train.stop_after), resuming from its latest checkpoint.

  Returns the last logged values. Raises config.ConfigError for anything the user must fix, and
  FloatingPointError when an update is non-finite (see train.skip_nonfinite).
  """
  # ---------------------------------------------------------------- Checks, mesh, optimizer.
  config.validate(cfg)
  mesh = sharding.make_mesh(cfg)
  tx = optim.make_optimizer(cfg)
  peak_flops = metrics.peak_flops_per_device(cfg)  # None: MFU unknown on this device.
  last_step = min(cfg.train.stop_after or cfg.train.steps, cfg.train.steps)
  is_search = cfg.train.trainable == 'temperature'
  if is_search and not cfg.search.base:
    raise config.ConfigError("train.trainable='temperature' needs search.base, the workdir of a pretrained model; set --config.search.base=DIR.")
  logging.info('Mesh %s over %d devices (%s).', dict(mesh.shape), mesh.size, jax.devices()[0].device_kind)
  logging.info('Attention kernel %s: %s.', *attention.kernel_for_run(cfg, mesh.devices.flat[0].platform))

  # Whatever is entered on `cleanup` is undone on the way out, errors included: the checkpoint
  # being written completes, the logs close, the workdir lock goes.
  with contextlib.ExitStack() as cleanup:
    cleanup.enter_context(jax.set_mesh(mesh))
    # SIGTERM / SIGINT from here on: finish the step, save, stop (and exit 0 from the command line).
    stop_signals = cleanup.enter_context(checkpoint.StopSignals())
    # -------------------------------------------------------------- Compiled steps, state.
    graphdef, abstract, shardings = step_lib.abstract_state(cfg, mesh, tx)
    batch_sharding = sharding.batch_sharding(mesh, cfg.mesh.rules)
    train_step = jax.jit(step_lib.make_train_step(cfg, graphdef, tx),
                         in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                         donate_argnums=0, compiler_options=sharding.compiler_options(mesh))
    eval_step = jax.jit(step_lib.make_eval_step(cfg, graphdef))  # Forward only: XLA's defaults are faster.

    def validation_loss(params, frozen):
      return step_lib.mean_eval_loss(cfg, eval_step, params, frozen, batch_sharding)

    _prepare_data(cfg)
    train_batches = data.train_iterator(cfg, sharding.process_rows(batch_sharding, cfg.train.batch_size))
    cleanup.enter_context(checkpoint.WorkdirLock(workdir))  # Before anything reads or writes the workdir.
    resumed = checkpoint.restore_newest(workdir, cfg, graphdef, abstract, train_batches)
    if resumed:
      state, meta, resume_step = resumed
      base = meta['base']
      logging.info('Resumed from step %d in %s.', resume_step, workdir)
    elif is_search:
      state, base = search.start_state(cfg, workdir, graphdef, abstract, shardings, tx, validation_loss)
    else:
      state, base = step_lib.init_state(cfg, shardings, tx), None
    first_step = int(state['step']) + 1
    _write_config(cfg, workdir, first_step - 1)

    # -------------------------------------------------------------- Loop.
    manager = checkpoint.make_manager(workdir, cfg)
    cleanup.callback(manager.close)  # Waits for a save in flight.
    writer = metrics.Writer(workdir, first_step)  # Drops what an earlier start logged after its last checkpoint.
    cleanup.callback(writer.close)
    throughput = metrics.Throughput(cfg, mesh.size, peak_flops)
    logged, pending, saved_step = {}, None, first_step - 1

    def finish(step, values):
      """Reads a dispatched step's metrics back (a sync point), stops or skips on a non-finite
      update, and logs log steps. The skipped updates are counted in the optimizer state, so the
      counts go on from a checkpoint."""
      values = {k: float(v) for k, v in jax.device_get(values).items()}
      in_a_row, skipped = int(values.pop('nonfinite_in_a_row')), int(values.pop('skipped_updates'))
      nonfinite = in_a_row > 0
      if in_a_row > cfg.train.skip_nonfinite:
        how_many = f' ({in_a_row} in a row)' if cfg.train.skip_nonfinite else ''
        last_good = checkpoint.checkpoint_dir(workdir) / str(saved_step) if saved_step else 'none yet'
        raise FloatingPointError(
            f'Step {step} had a non-finite loss ({values["loss"]}) or gradient norm ({values["grad_norm"]}){how_many}, '
            f'so its update was not applied and nothing after step {saved_step} was saved (last good checkpoint: '
            f'{last_good}); lower train.learning_rate or check the data, or set train.skip_nonfinite=N to skip up to '
            'N such updates in a row.')
      if nonfinite:
        logging.warning('Step %d: non-finite loss or gradient; update skipped (%d in a row).', step, in_a_row)
      if cfg.train.skip_nonfinite:
        values['skipped_updates'] = skipped
      if step == first_step or step % cfg.train.log_every == 0 or step == last_step or 'eval_loss' in values or nonfinite:
        values.update(throughput.report(step))
        writer.write(step, values)
        metrics.log_line(step, cfg.train.steps, values)
        logged.update(values, step=step)

    for step in range(first_step, last_step + 1):
      state, step_metrics = train_step(state, data.global_batch(next(train_batches), batch_sharding, cfg.train.batch_size))
      if pending:
        finish(*pending)  # Step N runs while step N-1's metrics are read.
      pending = (step, step_metrics)
      if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == last_step):
        eval_start = time.perf_counter()
        step_metrics['eval_loss'] = validation_loss(state['params'], state['frozen'])
        throughput.exclude(time.perf_counter() - eval_start)
      stopping = stop_signals.requested(step)
      if step % cfg.train.checkpoint_every == 0 or step == last_step or stopping:
        finish(*pending)  # A non-finite step stops the run here, before anything of it is saved.
        pending = None
        checkpoint.save(manager, state, train_batches, cfg, base)
        saved_step = step
      if stopping:
        logging.warning('Stopped at step %d by %s: checkpoint saved in %s; run the same command to resume.',
                        step, stop_signals.received or 'a stop signal', checkpoint.checkpoint_dir(workdir) / str(step))
        logged['stopped_at'] = step
        break
    if pending:
      finish(*pending)
    if saved_step != int(state['step']):
      checkpoint.save(manager, state, train_batches, cfg, base)
    if is_search:
      search.write_temperatures(workdir, search.temperatures_by_layer(state['params']),
                                search.temperatures_by_layer(state['params'], 'temperature_slope'))
  return logged


def dry_run(cfg) -> dict:
  """Builds the model and optimizer abstractly (no memory) and reports their size on the mesh."""
  config.validate(cfg)
  mesh = sharding.make_mesh(cfg)
  tx = optim.make_optimizer(cfg)
  with jax.set_mesh(mesh):
    _, abstract, shardings = step_lib.abstract_state(cfg, mesh, tx)
  model_state = step_lib.model_state(abstract)
  report = {
      'mesh': dict(mesh.shape),
      'devices': mesh.size,
      'params': model.count_params(model_state),
      'temperatures': model.count_params(model_state, model.Temperature, exclude=None),
      'trainable': model.count_params(abstract['params'], exclude=None),
      'param_bytes_per_device': sharding.bytes_per_device(model_state, step_lib.model_state(shardings)),
      'optimizer_bytes_per_device': sharding.bytes_per_device(abstract['opt'], shardings['opt']),
  }
  print(f'mesh: {report["mesh"]} ({report["devices"]} devices)')
  print(f'parameters: {report["params"]:,} + {report["temperatures"]:,} temperatures ({report["trainable"]:,} trainable)')
  print(f'bytes per device: params {report["param_bytes_per_device"]:,}, optimizer {report["optimizer_bytes_per_device"]:,}')
  return report
