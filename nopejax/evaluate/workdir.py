"""A whole evaluation of a workdir's latest checkpoint: the overrides it accepts, the lengths, every
measurement, results.json, the plots and report.md."""
import json

import jax
import numpy as np
from absl import logging
from etils import epath
from flax import nnx

from nopejax import checkpoint, config, data, paths, search
from nopejax import model as model_lib
from nopejax.config import ConfigError
from nopejax.evaluate import entropy, passkey, perplexity, report, ruler

# Keys an evaluation may override; the rest describe the trained model and come from its workdir.
# The position keys are the zero-shot extensions (RoPE scalings, log-n): they change no parameter.
POSITION_OVERRIDES = ('model.rope_scaling', 'model.rope_scaling_factor', 'model.original_length',
                      'model.yarn_beta_fast', 'model.yarn_beta_slow', 'model.llama3_low_freq_factor',
                      'model.llama3_high_freq_factor', 'model.logn', 'model.llama4_scaling',
                      'model.llama4_floor_scale', 'model.llama4_attn_scale')
_OVERRIDABLE = ('model.temperature', 'data.dataset', 'data.text_dir', 'data.text_key', 'data.tfds_dir',
                'data.tokenizer') + POSITION_OVERRIDES


class _CachedDocuments:
  """Tokenized documents of a split, read once and iterable many times (one per length)."""

  def __init__(self, source):
    self.source, self.cache = source, []

  def __iter__(self):
    yield from self.cache
    for i in range(len(self.cache), len(self.source)):
      self.cache.append(np.asarray(self.source[i], np.int32))
      yield self.cache[-1]


def _run_info(workdir, cfg, step) -> dict:
  """Kind, step, pretraining length (from the base run for a search) and search length of a workdir's step."""
  meta = checkpoint.read_meta(workdir, step)
  info = {'kind': meta['kind'], 'step': step, 'pretrain_length': cfg.data.seq_len, 'search_length': None}
  if meta['kind'] == 'search':
    base_dir = (meta.get('base') or {}).get('workdir') or cfg.search.base
    base_config = paths.resolve(base_dir) / 'config.json'
    if not base_config.exists():
      raise ConfigError(f'The search run {workdir} points to base run {base_dir}, which has no config.json; '
                        'restore that directory so the pretraining length is known.')
    info['pretrain_length'] = config.load_json(base_config).data.seq_len
    info['search_length'] = cfg.data.seq_len
    info['base_workdir'] = base_dir
  return info


def eval_lengths(cfg, pretrain_length: int) -> tuple[list[int], int]:
  """(window lengths, stride) from cfg.eval, defaults resolved against the pretraining length; checked."""
  e = cfg.eval
  if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in e.lengths):
    raise ConfigError(f'eval.lengths={e.lengths!r} must hold positive integers; '
                      "set e.g. --config.eval.lengths='(2048,8192)', or () for 1 to 16 x the pretraining length.")
  lengths = list(e.lengths) or [k * pretrain_length for k in (1, 2, 4, 8, 16)]
  stride = e.stride or max(1, min(256, pretrain_length // 4))
  if stride <= 0:
    raise ConfigError(f'eval.stride={e.stride} must be positive (or 0 for the default); '
                      'set e.g. --config.eval.stride=256.')
  too_short = [n for n in lengths if n <= stride]
  if too_short:
    raise ConfigError(f'eval.lengths has {too_short[0]}, not longer than the stride {stride}; '
                      'use longer lengths or a smaller --config.eval.stride.')
  for key in ('max_tokens', 'batch_size', 'query_chunk'):
    if e[key] <= 0:
      raise ConfigError(f'eval.{key}={e[key]} must be positive; set --config.eval.{key} to a positive integer.')
  for key in ('passkey_depths', 'passkey_keys', 'entropy_documents', 'position_documents'):
    if e[key] < 0:
      raise ConfigError(f'eval.{key}={e[key]} must not be negative; set --config.eval.{key}=0 to skip it.')
  if e.split not in data.SPLITS:
    raise ConfigError(f'eval.split={e.split!r} is not one of {data.SPLITS}; pick one of those.')
  return sorted(set(lengths)), stride


def check_overrides(overrides: dict) -> None:
  """Only the temperature, the corpus and eval.* may differ from the trained run's config."""
  for key in overrides:
    if not config.is_declared(key):
      raise ConfigError(
          f'Unknown config key {key}; every key is declared in nopejax/defaults.py, check the spelling there.')
    if not (key.startswith('eval.') or key in _OVERRIDABLE):
      raise ConfigError(f'{key} describes the trained run and cannot change at evaluation; '
                        f'only eval.*, {", ".join(_OVERRIDABLE)} can be overridden.')
  temperature = overrides.get('model.temperature')
  if temperature is not None and not temperature > 0:
    raise ConfigError(f'model.temperature={temperature} must be positive (it multiplies every query); '
                      'set a value like 1.5.')


def _set_key(cfg, dotted, value):
  *parents, leaf = dotted.split('.')
  node = cfg
  for name in parents:
    node = node[name]
  node[leaf] = tuple(value) if isinstance(node[leaf], tuple) else value


def _position_settings(position_overrides) -> list[str]:
  """['logn=True', 'rope_scaling=yarn'] for position overrides, sorted."""
  return [f'{key.split(".")[-1]}={value:g}' if isinstance(value, float) else f'{key.split(".")[-1]}={value}'
          for key, value in sorted(position_overrides.items())]


def default_out_dir(workdir, temperature=None, position_overrides=None) -> epath.Path:
  """WORKDIR/eval, WORKDIR/eval_c1.5 for a uniform temperature override of 1.5, and the position
  overrides appended (WORKDIR/eval_rope_scaling=yarn)."""
  name = 'eval' if temperature is None else f'eval_c{temperature:g}'
  return paths.resolve(workdir) / '_'.join([name] + _position_settings(position_overrides or {}))


def with_position_overrides(model, cfg):
  """The model rebuilt for cfg's position settings (RoPE scaling, log-n) with the same parameters."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: model_lib.Transformer(cfg, nnx.Rngs(0))))
  return nnx.merge(graphdef, nnx.state(model))


def evaluate(workdir, overrides=None, out=None) -> dict:
  """Evaluates the latest checkpoint of `workdir` and writes results.json, plots and report.md.

  overrides: {'eval.lengths': (64, 256), 'model.temperature': 1.5, ...}; a temperature sets
  every head to that value. out: the output directory (default `default_out_dir`). Returns the
  results dict. Raises ConfigError for anything the user must fix, before writing anything.
  """
  overrides = dict(overrides or {})
  check_overrides(overrides)
  temperature = overrides.pop('model.temperature', None)
  position_overrides = {key: value for key, value in overrides.items() if key in POSITION_OVERRIDES}
  out = paths.resolve(out) if out else default_out_dir(workdir, temperature, position_overrides)
  if jax.process_index() == 0:
    checkpoint.check_writable(out, '--out')  # Before the evaluation, not after it.
  # The newest step that reads back whole: a damaged newer one is passed over with a warning, never renamed.
  model, cfg, step = checkpoint.load_with_step(workdir, temperature)
  for key, value in overrides.items():
    _set_key(cfg, key, value)
  if position_overrides:
    config.validate(cfg)
    model = with_position_overrides(model, cfg)
  info = _run_info(workdir, cfg, step)
  lengths, stride = eval_lengths(cfg, info['pretrain_length'])
  e = cfg.eval
  tokenizer = data.make_tokenizer(cfg)
  documents = _CachedDocuments(data.documents(cfg, e.split))
  label = (paths.resolve(workdir).name + ('' if temperature is None else f' c={temperature:g}')
           + ''.join(f' {setting}' for setting in _position_settings(position_overrides)))
  logging.info('Evaluating %s (%s, step %d) at lengths %s, stride %d -> %s', workdir, info['kind'], info['step'],
               lengths, stride, out)

  results = {
      'label': label, 'workdir': str(paths.resolve(workdir)), **info, 'temperature_override': temperature,
      'temperatures': search.temperatures_by_layer(nnx.state(model)),
      'temperature_schedule': cfg.model.temperature_schedule,
      # The log schedule's a_h beside its c_h: [layer][head], as temperatures.json has them.
      **({'temperature_slopes': search.temperatures_by_layer(nnx.state(model), 'temperature_slope')}
         if cfg.model.temperature_schedule == 'log' else {}),
      'dataset': cfg.data.dataset, 'split': e.split, 'lengths': lengths, 'stride': stride,
      'perplexity': {}, 'perplexity_detail': {}, 'passkey': {}, 'passkey_detail': {},
      'ruler': {}, 'ruler_detail': {},
  }
  score_windows = perplexity.window_scorer(model, stride, e.query_chunk)
  for n in lengths:
    detail = perplexity.perplexity(documents, n, stride, e.max_tokens, e.batch_size, score_windows)
    results['perplexity'][str(n)] = detail.pop('perplexity')
    results['perplexity_detail'][str(n)] = detail
    logging.info('length %d: perplexity %s over %d windows of %d documents', n, results['perplexity'][str(n)],
                 detail['windows'], detail['documents'])

  if e.passkey_keys and e.passkey_depths:
    keys_DxK = passkey.passkey_keys(e.passkey_depths, e.passkey_keys, e.seed)
    for n in lengths:
      detail = passkey.passkey(model, tokenizer, n, keys_DxK, e.batch_size, e.query_chunk)
      results['passkey'][str(n)] = None if detail is None else detail.pop('accuracy')
      results['passkey_detail'][str(n)] = detail
      logging.info('length %d: passkey accuracy %s', n, results['passkey'][str(n)])
    # RULER's tasks take as many examples per task and length as the passkey has prompts.
    for n in lengths:
      by_task = ruler.ruler(model, tokenizer, n, e.passkey_depths * e.passkey_keys, e.batch_size, e.query_chunk,
                            e.seed)
      for task, detail in by_task.items():
        results['ruler'].setdefault(task, {})[str(n)] = None if detail is None else detail.pop('accuracy')
        results['ruler_detail'].setdefault(task, {})[str(n)] = detail
      logging.info('length %d: RULER accuracy %s', n, {task: results['ruler'][task][str(n)] for task in by_task})

  longest = max(lengths)
  stats = entropy.position_stats(model, documents, longest, e.position_documents, e.entropy_documents,
                         e.batch_size, e.query_chunk)
  entropy_LxHxN = stats['entropy_LxHxN']
  results.update(
      loss_by_position=stats['loss_by_position'],
      loss_by_band=entropy.band_means(stats['loss_by_position'], info['pretrain_length']),
      position_documents=stats['position_documents'],
      entropy_documents=stats['entropy_documents'])
  if entropy_LxHxN.size:
    mean_N = entropy_LxHxN.mean(axis=(0, 1))
    positions = entropy.log_positions(longest)
    results['entropy_mean'] = {str(i + 1): float(v) for i, v in enumerate(mean_N)}
    results['entropy_by_layer'] = {
        'positions': positions,
        'values': entropy_LxHxN.mean(axis=1)[:, np.array(positions) - 1].tolist()}
    results['entropy_last'] = entropy_LxHxN[:, :, -1].tolist()
  else:
    logging.warning('No %s document has %d tokens: no loss-by-position or entropy curves.', e.split, longest + 1)
    results.update(entropy_mean={}, entropy_by_layer={'positions': [], 'values': []}, entropy_last=[])
  results['config'] = cfg.to_dict()

  if jax.process_index() == 0:
    out.mkdir(parents=True, exist_ok=True)
    with (out / 'entropy.npz').open('wb') as f:
      np.savez_compressed(f, entropy_LxHxN=entropy_LxHxN.astype(np.float32),
                          loss_by_position=np.asarray(stats['loss_by_position'], np.float32))
    results['plots'] = report.write_plots(results, entropy_LxHxN, out)
    (out / 'results.json').write_text(json.dumps(results, indent=1))
    report.write_report(results, out)
  return results
