"""The one mapping between a Hugging Face Llama (or SmolLM3, the same tensors: smollm3.py) and a
nopejax model: tensor names and layouts, and the two configs (config.json <-> the nopejax config)."""
import numpy as np

from nopejax import config
from nopejax.config import ConfigError
from nopejax.convert import smollm3


def hf_layout(cfg) -> dict:
  """{nopejax pure-dict path: (Hugging Face tensor name, how the arrays relate)} for cfg's model.

  The kinds: 'same'; 'transpose' (HF Linear weights are [out, in]); 'heads_in' (HF [heads * Dh, D]
  = ours [D, heads, Dh] for q, k, v); 'heads_out' (HF o_proj [D, H * Dh] = ours [H, Dh, D]).
  """
  layout = {('embed_VxD',): ('model.embed_tokens.weight', 'same'),
            ('final_norm', 'scale'): ('model.norm.weight', 'same')}
  if not cfg.model.tie_embeddings:
    layout[('head_DxV',)] = ('lm_head.weight', 'transpose')
  for i in range(cfg.model.num_layers):
    hf = f'model.layers.{i}.'
    layout.update({
        ('blocks', i, 'attention_norm', 'scale'): (hf + 'input_layernorm.weight', 'same'),
        ('blocks', i, 'attention', 'q_DxHxDh'): (hf + 'self_attn.q_proj.weight', 'heads_in'),
        ('blocks', i, 'attention', 'k_DxKxDh'): (hf + 'self_attn.k_proj.weight', 'heads_in'),
        ('blocks', i, 'attention', 'v_DxKxDh'): (hf + 'self_attn.v_proj.weight', 'heads_in'),
        ('blocks', i, 'attention', 'o_HxDhxD'): (hf + 'self_attn.o_proj.weight', 'heads_out'),
        ('blocks', i, 'attention', 'temperature'): (hf + 'self_attn.scale_param', 'same'),
        ('blocks', i, 'mlp_norm', 'scale'): (hf + 'post_attention_layernorm.weight', 'same'),
        ('blocks', i, 'mlp', 'gate_DxF'): (hf + 'mlp.gate_proj.weight', 'transpose'),
        ('blocks', i, 'mlp', 'up_DxF'): (hf + 'mlp.up_proj.weight', 'transpose'),
        ('blocks', i, 'mlp', 'down_FxD'): (hf + 'mlp.down_proj.weight', 'transpose'),
    })
  return layout


def is_temperature(path) -> bool:
  return path[-1] == 'temperature'


def to_nopejax(kind, hf_array, shape):
  """The HF array (a numpy view, nothing copied) laid out as nopejax's array of `shape`."""
  if kind == 'same':
    return hf_array
  if kind == 'transpose':
    return hf_array.T
  if kind == 'heads_in':
    D, H, Dh = shape
    return hf_array.reshape(H, Dh, D).transpose(2, 0, 1)
  H, Dh, D = shape  # heads_out
  return hf_array.reshape(D, H, Dh).transpose(1, 2, 0)


def to_hf(kind, array):
  """Inverse of to_nopejax."""
  if kind == 'same':
    return array
  if kind == 'transpose':
    return array.T
  if kind == 'heads_in':
    D, H, Dh = array.shape
    return array.transpose(1, 2, 0).reshape(H * Dh, D)
  H, Dh, D = array.shape  # heads_out
  return array.transpose(2, 0, 1).reshape(D, H * Dh)


def hf_shape(kind, shape):
  return to_hf(kind, np.empty(shape, np.int8)).shape


# Tensors some Llama checkpoints carry that a forward pass does not use.
IGNORED_SUFFIXES = ('.rotary_emb.inv_freq',)


def at(tree, path):
  """The leaf of a nested dict at a layout path."""
  for key in path:
    tree = tree[key]
  return tree


def config_from_hf(hf_config: dict, nope: bool, hf_dir: str):
  """The nopejax config of a Hugging Face Llama or SmolLM3 config.json; one ConfigError for what it cannot express."""
  def unsupported(what, fix='only Llama models with these settings off convert'):
    raise ConfigError(f'{hf_dir}/config.json has {what}, which nopejax cannot express; {fix}.')

  model_type = hf_config.get('model_type')
  if model_type not in ('llama', 'smollm3'):
    unsupported(f'model_type={model_type!r}', "only Llama and SmolLM3 models (model_type 'llama' or 'smollm3') convert")
  position, rope_layers = 'nope' if nope else 'rope', ''
  if model_type == 'smollm3':
    if nope:
      raise ConfigError(f'--nope is for Llama checkpoints, but {hf_dir}/config.json is a SmolLM3 whose no_rope_layers '
                        'say which layers use RoPE; convert it without --nope.')
    try:
      position, rope_layers = smollm3.layer_positions(hf_config, hf_dir)
    except KeyError as e:
      raise ConfigError(f'{hf_dir}/config.json lacks {e.args[0]}; it is not a complete SmolLM3 config.') from e
  nope = position == 'nope'  # Below: whether no layer rotates.
  if hf_config.get('hidden_act', 'silu') != 'silu':
    unsupported(f'hidden_act={hf_config["hidden_act"]!r}', 'nopejax MLPs are SwiGLU (silu)')
  for key in ('attention_bias', 'mlp_bias'):
    if hf_config.get(key):
      unsupported(f'{key}=true', 'nopejax projections have no bias')
  rope = dict(hf_config.get('rope_parameters') or {})
  scaling = hf_config.get('rope_scaling') or {}
  rope_type = scaling.get('rope_type', scaling.get('type')) or rope.get('rope_type', 'default')
  if not nope and rope_type != 'default':
    unsupported(f'RoPE scaling {rope_type!r}', 'convert a model with plain RoPE, or pass --nope for a NoPE model')
  if not nope and hf_config.get('partial_rotary_factor', 1.0) != 1.0:
    unsupported(f'partial_rotary_factor={hf_config["partial_rotary_factor"]}', 'nopejax rotates every head dimension')
  default_theta = smollm3.DEFAULT_THETA if model_type == 'smollm3' else 10000.0
  try:
    heads = hf_config['num_attention_heads']
    cfg = config.from_dict({
        'model': {
            'vocab_size': hf_config['vocab_size'],
            'num_layers': hf_config['num_hidden_layers'],
            'embed_dim': hf_config['hidden_size'],
            'num_heads': heads,
            'num_kv_heads': hf_config.get('num_key_value_heads') or heads,
            'head_dim': hf_config.get('head_dim') or hf_config['hidden_size'] // heads,
            'mlp_dim': hf_config['intermediate_size'],
            'norm_eps': float(hf_config.get('rms_norm_eps', 1e-6)),
            'position': position,
            'rope_layers': rope_layers,
            'rope_theta': float(rope.get('rope_theta', hf_config.get('rope_theta', default_theta))),
            'tie_embeddings': bool(hf_config.get('tie_word_embeddings', model_type == 'smollm3')),
        },
        'data': {'seq_len': int(hf_config.get('max_position_embeddings', 2048))},
    })
  except KeyError as e:
    raise ConfigError(f'{hf_dir}/config.json lacks {e.args[0]}; it is not a complete Llama config.') from e
  # Continued pretraining starts from the end of a schedule: the learning rate TinyLlama ended at.
  cfg.train.learning_rate = 4e-5
  config.validate(cfg)
  return cfg


def decoder_keys(cfg) -> dict:
  """The config.json keys of the decoder's shape, the same in the Llama and SmolLM3 layouts."""
  m = cfg.model
  return {
      'vocab_size': m.vocab_size, 'hidden_size': m.embed_dim, 'intermediate_size': m.mlp_dim,
      'num_hidden_layers': m.num_layers, 'num_attention_heads': m.num_heads,
      'num_key_value_heads': m.num_kv_heads, 'head_dim': config.head_dim(cfg), 'hidden_act': 'silu',
      'rms_norm_eps': m.norm_eps, 'tie_word_embeddings': m.tie_embeddings,
      'attention_bias': False, 'mlp_bias': False,
  }


def hf_config_of(cfg, source=None, dtype='float32') -> dict:
  """A transformers LlamaConfig dict for cfg's model; keys of the source config.json kept where unchanged."""
  m = cfg.model
  out = dict((source or {}).get('config') or {})
  out.update({
      'architectures': ['LlamaForCausalLM'], 'model_type': 'llama',
      **decoder_keys(cfg),
  })
  out.setdefault('max_position_embeddings', cfg.data.seq_len)
  # transformers 5 writes rope_parameters and dtype, 4 wrote rope_theta and torch_dtype: update the
  # source's own keys (a NoPE model keeps its unused rotary settings as they were), or write both.
  if m.position == 'rope' or not source:
    if 'rope_parameters' in out or not source:
      out['rope_parameters'] = {'rope_type': 'default', 'rope_theta': m.rope_theta}
    if 'rope_theta' in out or not source:
      out['rope_theta'] = m.rope_theta
  for key in ('dtype', 'torch_dtype'):
    if key in out or not source:
      out[key] = dtype
  if m.position == 'nope':
    out['nope'] = True  # A marker for people and for from-hf: transformers' Llama rotates regardless.
  return out
