"""The SmolLM3 layout: a Llama whose config.json says per layer whether RoPE applies (`no_rope_layers`,
1 = RoPE, 0 = NoPE), which transformers and vLLM load with no custom code. A NoPE model is a
SmolLM3 with every flag 0; a hybrid (`model.rope_layers`) one with its flags. Tensor names are
Llama's (layout.hf_layout) without `scale_param`: temperatures are folded into q_proj, exact on
RoPE layers too, since a per-head scale commutes with the rotation.
"""
from nopejax import config, positions
from nopejax.convert import layout
from nopejax.config import ConfigError

LAYOUTS = ('smollm3', 'llama')  # to-hf --layout; 'auto' = smollm3 unless every layer uses RoPE.
DEFAULT_THETA = 2000000.0  # SmolLM3Config.default_theta: what transformers assumes when config.json names none.
TOKEN_KEYS = ('bos_token_id', 'eos_token_id', 'pad_token_id')  # SmolLM3Config's defaults index a 128k vocabulary.


def rope_flags(cfg) -> tuple:
  """One bool per layer, True where RoPE applies: model.rope_layers, or every layer as model.position."""
  flags = positions.layer_flags(cfg.model.rope_layers, cfg.model.num_layers)
  return flags if flags is not None else (cfg.model.position == 'rope',) * cfg.model.num_layers


def resolve_layout(cfg, layout: str, workdir) -> str:
  """to-hf's layout for cfg's model: 'auto' is llama for a RoPE model, smollm3 for NoPE and hybrids."""
  if layout not in LAYOUTS + ('auto',):
    raise ConfigError(f"--layout {layout} is not one of {('auto',) + LAYOUTS}; pick one of those.")
  flags = rope_flags(cfg)
  if layout == 'auto':
    layout = 'llama' if all(flags) else 'smollm3'
  if layout == 'llama' and len(set(flags)) > 1:
    raise ConfigError(f'{workdir} is a hybrid (model.rope_layers={cfg.model.rope_layers!r}) but a Llama uses RoPE on '
                      'every layer or (patched) none; export it with --layout=smollm3.')
  return layout


def layer_positions(hf_config: dict, hf_dir) -> tuple[str, str]:
  """(model.position, model.rope_layers) of a SmolLM3 config.json, read as transformers reads it;
  ConfigError for sliding-window attention, which nopejax does not run."""
  layers = hf_config['num_hidden_layers']
  flags = hf_config.get('no_rope_layers')
  if flags is None:  # transformers: a NoPE layer every no_rope_layer_interval layers.
    interval = hf_config.get('no_rope_layer_interval', 4)
    flags = [int((i + 1) % interval != 0) for i in range(layers)]
  if not isinstance(flags, list) or len(flags) < layers or any(f not in (0, 1) for f in flags):
    raise ConfigError(f'{hf_dir}/config.json has no_rope_layers={flags!r}, not one 0 or 1 per layer of its '
                      f'{layers}; fix the list (1 = RoPE, 0 = NoPE).')
  flags = [bool(f) for f in flags[:layers]]  # transformers reads the first num_hidden_layers.
  layer_types = hf_config.get('layer_types') or [
      'sliding_attention' if not uses_rope else 'full_attention' for uses_rope in flags]
  if hf_config.get('use_sliding_window') and hf_config.get('sliding_window') is not None and (
      'sliding_attention' in layer_types[:layers]):
    raise ConfigError(f'{hf_dir}/config.json has use_sliding_window=true, which nopejax cannot express; only SmolLM3 '
                      'models with full attention on every layer convert.')
  if all(flags):
    return 'rope', ''
  if not any(flags):
    return 'nope', ''
  return 'rope', positions.flags_string(flags)


def hf_config_of(cfg, source=None, dtype='float32') -> dict:
  """A transformers SmolLM3Config dict for cfg's model; a SmolLM3 source's other keys kept, a Llama
  source's token ids kept."""
  m = cfg.model
  source_config = (source or {}).get('config') or {}
  if source_config.get('model_type') == 'smollm3':
    out = dict(source_config)
  else:
    out = {key: source_config[key] for key in TOKEN_KEYS if key in source_config}
  interval = m.rope_layers[len('every:'):] if m.rope_layers.startswith('every:') else None
  out.update({
      'architectures': ['SmolLM3ForCausalLM'], 'model_type': 'smollm3',
      **layout.decoder_keys(cfg), 'use_sliding_window': False, 'sliding_window': None,
      'no_rope_layers': [int(f) for f in rope_flags(cfg)],
      # transformers 5 reads rope_parameters, 4 read rope_theta; both say the same. A NoPE model's
      # theta is unused, but SmolLM3's default one would be read if none were written.
      'rope_parameters': {'rope_type': 'default', 'rope_theta': m.rope_theta}, 'rope_theta': m.rope_theta,
      'dtype': dtype,
  })
  if interval is not None:  # Read only without no_rope_layers; written so the pattern is named.
    out['no_rope_layer_interval'] = int(interval)
  out.pop('rope_scaling', None)
  if 'torch_dtype' in out:
    out['torch_dtype'] = dtype
  out.setdefault('max_position_embeddings', cfg.data.seq_len)
  for key in TOKEN_KEYS:
    out.setdefault(key, None)
  return out
