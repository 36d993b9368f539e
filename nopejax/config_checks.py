"""The range of every numeric config key (nopejax/defaults.py) as one table, key -> rule, which
config.validate checks before the checks that relate keys to each other; and the checks of the
search's starting temperatures. A value out of range is one sentence naming the key, the value,
the rule and a value to set."""
import math

# Rule -> (whether a value passes, what the sentence says it must be).
RULES = {
    '>0': (lambda v: v > 0, '> 0'),
    '>=0': (lambda v: v >= 0, '>= 0'),
    '>=1': (lambda v: v >= 1, '>= 1'),
    '[0,1]': (lambda v: 0 <= v <= 1, 'in [0, 1]'),
    '[0,1)': (lambda v: 0 <= v < 1, 'in [0, 1)'),  # Adam's betas: at 1 its averages never take in a gradient.
    'axis': (lambda v: v >= 1 or v == -1, '>= 1, or -1 for the devices the other axes leave'),
}

# Key -> rule, or (rule, what a boundary value means). Tuples (eval.lengths, ...) hold only such values.
RANGES = {
    'model.vocab_size': '>0',
    'model.num_layers': '>0',
    'model.embed_dim': '>0',
    'model.num_heads': '>0',
    'model.num_kv_heads': '>0',
    'model.head_dim': ('>=0', '0 = embed_dim // num_heads'),
    'model.mlp_dim': '>0',
    'model.norm_eps': '>0',
    'model.init_std': '>0',
    'model.rope_theta': '>0',
    'model.rope_scaling_factor': ('>=0', '0 = each length / L, else at least 1'),
    'model.original_length': ('>=0', '0 = data.seq_len'),
    'model.yarn_beta_fast': '>0',
    'model.yarn_beta_slow': '>0',
    'model.llama3_low_freq_factor': '>0',
    'model.llama3_high_freq_factor': '>0',
    'model.llama4_floor_scale': '>0',
    'model.llama4_attn_scale': '>=0',
    'model.temperature': ('>0', 'it multiplies every query'),
    'model.temperature_length': ('>=0', '0 = data.seq_len'),
    'model.temperature_octaves': '>=1',
    'model.attention_block': ('>=0', "0 = the kernel's own choice"),
    'model.attention_chunked_from': '>=0',
    'data.open_shards': '>=1',
    'data.shuffle_buffer': ('>=0', '0 = no shuffle of the packed windows'),
    'data.seq_len': '>0',
    'data.shuffle_seed': '>=0',
    'data.worker_count': ('>=0', '0 reads in the main process'),
    'train.steps': '>0',
    'train.stop_after': ('>=0', '0 = run to train.steps'),
    'train.batch_size': '>0',
    'train.microbatches': ('>=1', '1 = no accumulation'),
    'train.loss_chunk': ('>=0', '0 = the whole sequence at once'),
    'train.learning_rate': '>=0',
    'train.warmup_steps': '>=0',
    'train.final_lr_fraction': '[0,1]',
    'train.b1': '[0,1)',
    'train.b2': '[0,1)',
    'train.eps': ('>0', 'it keeps Adam from dividing by zero'),
    'train.weight_decay': '>=0',
    # optax clips to the norm itself, so 0 would zero every update; a large value clips nothing.
    'train.clip_norm': ('>0', '0 would zero every update, a large value clips nothing'),
    'train.seed': '>=0',
    'train.log_every': '>=1',
    'train.eval_every': ('>=0', '0 = no evaluation during training'),
    'train.eval_batches': '>=1',
    'train.checkpoint_every': '>=1',
    'train.keep_checkpoints': '>=1',
    'train.skip_nonfinite': ('>=0', '0 stops at the first non-finite update, N skips up to N in a row'),
    'train.peak_flops_per_device': ('>=0', '0 = look it up or measure it'),
    'train.temperature.learning_rate': '>=0',
    'train.temperature.weight_decay': '>=0',
    'train.temperature.clip_norm': ('>0', '0 would zero every update, a large value clips nothing'),
    'mesh.data': 'axis',
    'mesh.fsdp': 'axis',
    'mesh.tensor': 'axis',
    'search.min_temperature': '>=0',
    'search.init_candidates': '>0',
    'search.lengths': ('>0', '() = data.seq_len alone'),
    'eval.lengths': ('>0', '() = 1 to 16 x the pretraining length'),
    'eval.stride': ('>=0', '0 = min(256, pretraining length / 4)'),
    'eval.max_tokens': '>0',
    'eval.batch_size': '>0',
    'eval.query_chunk': '>0',
    'eval.passkey_depths': ('>=0', '0 skips the passkey'),
    'eval.passkey_keys': ('>=0', '0 skips the passkey'),
    'eval.entropy_documents': ('>=0', '0 skips the entropy curves'),
    'eval.position_documents': ('>=0', '0 skips the loss-by-position curve'),
    'eval.seed': '>=0',
}


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _passes(value, rule) -> bool:
  return _number(value) and math.isfinite(value) and RULES[rule][0](value)


def out_of_range(cfg, defaults) -> str | None:
  """The sentence for the first key of RANGES whose value is out of its range; None if none is."""
  for key, entry in RANGES.items():
    rule, note = entry if isinstance(entry, tuple) else (entry, '')
    section, name = key.rsplit('.', 1)
    value, default = _get(cfg, section)[name], _get(defaults, section)[name]
    values = value if isinstance(value, tuple) else (value,)
    if all(_passes(v, rule) for v in values):
      continue
    finite = ' a finite number' if any(isinstance(v, float) for v in values) else ''
    what = f'hold only numbers {RULES[rule][1]}' if isinstance(value, tuple) else f'be{finite} {RULES[rule][1]}'
    return (f'{key}={value} must {what}{f" ({note})" if note else ""}; '
            f'set it to e.g. {default} (the default).')
  return None


def _get(cfg, section):
  for name in section.split('.'):
    cfg = cfg[name]
  return cfg


def search_start_problem(init, candidates, min_temperature) -> str | None:
  """A search's start (search.init, or with 'auto' each of search.init_candidates) at or above
  search.min_temperature, where the first update's projection would otherwise move it: the sentence
  if not, else None."""
  if init != 'auto' and init < min_temperature:
    return (f'search.init={init} is below search.min_temperature={min_temperature}, so the first '
            'update would clamp it; set search.init to at least that, or lower search.min_temperature.')
  if init == 'auto' and (not candidates or min(candidates) < min_temperature):
    return (f'search.init_candidates={candidates} must be a non-empty list of temperatures of at least '
            f'search.min_temperature={min_temperature} (search.init=auto tries each); drop the lower ones '
            'or lower search.min_temperature.')
  return None
