"""Hugging Face Llama checkpoints <-> nopejax workdirs.

  python -m nopejax.convert from-hf --hf_dir DIR --workdir OUT [--nope] [--tokenizer PATH] [--compute_dtype bfloat16]
  python -m nopejax.convert to-hf --workdir W --hf_dir OUT [--dtype bfloat16] [--fold_temperatures]

from-hf reads config.json and the safetensors weights (one file, or shards listed in
model.safetensors.index.json) one shard at a time, placing each tensor straight onto a mesh over
every device (split along the width, so no device holds a whole copy) and writes OUT/config.json
and a weights-only orbax checkpoint: `nopejax.load`, `evaluate`, the search (`search.base=OUT`)
and training resumed in OUT (continued pretraining, fresh optimizer) all read it.
Per-head scales stored as `model.layers.{i}.self_attn.scale_param` (the authors' head-scale
models) become the temperatures: their code multiplies q by scale_param / sqrt(head_dim) and then
runs attention with scale 1, which is nopejax's q * c_h followed by the usual 1 / sqrt(d).

to-hf writes config.json and safetensors a Llama of transformers loads; temperatures other than 1
are written as scale_param (the published head-scale format), or folded into q_proj with
--fold_temperatures so that a plain LlamaForCausalLM computes the same model. See the README for
loading a NoPE model in transformers.
"""
import argparse
import json
import math
import os
import shutil
import struct
import sys

import ml_dtypes
import numpy as np
from etils import epath

from nopejax import config
from nopejax.config import ConfigError

# ---------------------------------------------------------------------------------------------
# safetensors: an 8-byte little-endian header size, a JSON header {name: {dtype, shape,
# data_offsets}}, then the raw little-endian bytes of every tensor.

_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_,
}
_DTYPE_NAMES = {np.dtype(t): name for name, t in _SAFETENSORS_DTYPES.items()}
DTYPES = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16, 'float16': np.float16}


class SafetensorsFile:
  """One .safetensors file: names, dtypes and shapes from its header; each tensor read when asked."""

  def __init__(self, path):
    self.path = path
    try:
      with open(path, 'rb') as f:
        (header_size,) = struct.unpack('<Q', f.read(8))
        header = json.loads(f.read(header_size))
      self.data_start = 8 + header_size
      header.pop('__metadata__', None)
      self.tensors = {name: (np.dtype(_SAFETENSORS_DTYPES[entry['dtype']]), tuple(entry['shape']),
                             tuple(entry['data_offsets'])) for name, entry in header.items()}
    except (OSError, struct.error, ValueError, KeyError, TypeError, AttributeError) as e:
      raise ConfigError(f'{path} is not a readable safetensors file ({type(e).__name__}: {e}); '
                        'download it again.') from e

  def read(self, name) -> np.ndarray:
    """The tensor as a numpy array of its stored dtype (bfloat16 as ml_dtypes.bfloat16)."""
    dtype, shape, (begin, end) = self.tensors[name]
    with open(self.path, 'rb') as f:
      f.seek(self.data_start + begin)
      raw = f.read(end - begin)
    if len(raw) != end - begin or end - begin != math.prod(shape) * dtype.itemsize:
      raise ConfigError(f'{self.path} is truncated or damaged at tensor {name}; download it again.')
    return np.frombuffer(raw, dtype.newbyteorder('<')).reshape(shape)


def write_safetensors(path, tensors: dict) -> None:
  """Writes {name: numpy array} as one safetensors file, tensors in name order."""
  header, offset = {}, 0
  for name in sorted(tensors):
    array = tensors[name]
    header[name] = {'dtype': _DTYPE_NAMES[array.dtype], 'shape': list(array.shape),
                    'data_offsets': [offset, offset + array.nbytes]}
    offset += array.nbytes
  header['__metadata__'] = {'format': 'pt'}
  blob = json.dumps(header, separators=(',', ':')).encode()
  blob += b' ' * (-len(blob) % 8)  # The data starts 8-byte aligned, as the safetensors library writes it.
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(blob)))
    f.write(blob)
    for name in sorted(tensors):
      f.write(np.ascontiguousarray(tensors[name], tensors[name].dtype.newbyteorder('<')).tobytes())


def checkpoint_files(hf_dir) -> dict:
  """{tensor name: SafetensorsFile} of a Hugging Face directory, from its index or its one file."""
  index_path = os.path.join(hf_dir, 'model.safetensors.index.json')
  single_path = os.path.join(hf_dir, 'model.safetensors')
  if os.path.exists(index_path):
    with open(index_path) as f:
      weight_map = json.load(f)['weight_map']
    files = {name: SafetensorsFile(os.path.join(hf_dir, name)) for name in sorted(set(weight_map.values()))}
    located = {name: files[file_name] for name, file_name in weight_map.items()}
  elif os.path.exists(single_path):
    single = SafetensorsFile(single_path)
    located = {name: single for name in single.tensors}
  else:
    bins = [n for n in os.listdir(hf_dir) if n.endswith('.bin')]
    hint = ' (it has PyTorch .bin files: save their state dict as safetensors first, the README shows how)' if bins else ''
    raise ConfigError(f'--hf_dir {hf_dir} has neither model.safetensors nor model.safetensors.index.json{hint}; '
                      'point it at a Hugging Face model directory.')
  for name, file in located.items():
    if name not in file.tensors:
      raise ConfigError(f'{file.path} lacks tensor {name} that model.safetensors.index.json places there; '
                        'download the checkpoint again.')
  return located


# ---------------------------------------------------------------------------------------------
# The one mapping between the two layouts.


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


# ---------------------------------------------------------------------------------------------
# Configs.

# Tensors some Llama checkpoints carry that a forward pass does not use.
_IGNORED_SUFFIXES = ('.rotary_emb.inv_freq',)


def config_from_hf(hf_config: dict, nope: bool, hf_dir: str):
  """The nopejax config of a Hugging Face Llama config.json; one ConfigError for what it cannot express."""
  def unsupported(what, fix='only Llama models with these settings off convert'):
    raise ConfigError(f'{hf_dir}/config.json has {what}, which nopejax cannot express; {fix}.')

  if hf_config.get('model_type') != 'llama':
    unsupported(f'model_type={hf_config.get("model_type")!r}', "only Llama models (model_type 'llama') convert")
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
            'position': 'nope' if nope else 'rope',
            'rope_theta': float(rope.get('rope_theta', hf_config.get('rope_theta', 10000.0))),
            'tie_embeddings': bool(hf_config.get('tie_word_embeddings', False)),
        },
        'data': {'seq_len': int(hf_config.get('max_position_embeddings', 2048))},
    })
  except KeyError as e:
    raise ConfigError(f'{hf_dir}/config.json lacks {e.args[0]}; it is not a complete Llama config.') from e
  # Continued pretraining starts from the end of a schedule: the learning rate TinyLlama ended at.
  cfg.train.learning_rate = 4e-5
  config.validate(cfg)
  return cfg


def hf_config_of(cfg, source=None, dtype='float32') -> dict:
  """A transformers LlamaConfig dict for cfg's model; keys of the source config.json kept where unchanged."""
  m = cfg.model
  out = dict((source or {}).get('config') or {})
  out.update({
      'architectures': ['LlamaForCausalLM'], 'model_type': 'llama',
      'vocab_size': m.vocab_size, 'hidden_size': m.embed_dim, 'intermediate_size': m.mlp_dim,
      'num_hidden_layers': m.num_layers, 'num_attention_heads': m.num_heads,
      'num_key_value_heads': m.num_kv_heads, 'head_dim': config.head_dim(cfg), 'hidden_act': 'silu',
      'rms_norm_eps': m.norm_eps, 'tie_word_embeddings': m.tie_embeddings,
      'attention_bias': False, 'mlp_bias': False,
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


# ---------------------------------------------------------------------------------------------
# from-hf

SOURCE_FILE = 'hf_source.json'  # In a converted workdir: the source directory, config.json and dtypes.


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _check_tensors(cfg, layout, shapes, located, hf_dir):
  """{HF name: (our path, kind, HF shape)} once every tensor the model needs is there with its
  shape and nothing the model cannot use is."""
  expected = {}
  for path, (name, kind) in layout.items():
    expected[name] = (path, kind, hf_shape(kind, _at(shapes, path).shape))
  needed = {name for name, (path, _, _) in expected.items() if not is_temperature(path)}
  missing = sorted(needed - set(located))
  if missing:
    raise ConfigError(f'{hf_dir} lacks tensor {missing[0]} ({len(missing)} missing) that a Llama of its '
                      'config.json has; check the download or the config.')
  ignored = {n for n in located if n.endswith(_IGNORED_SUFFIXES)}
  if cfg.model.tie_embeddings:
    ignored.add('lm_head.weight')  # Some tied checkpoints store the shared matrix twice.
  extra = sorted(set(located) - set(expected) - ignored)
  if extra:
    raise ConfigError(f'{hf_dir} has tensor {extra[0]} that a Llama without biases or extra parts has no place '
                      'for; nopejax cannot express this model.')
  for name, file in located.items():
    if name in expected and file.tensors[name][1] != expected[name][2]:
      raise ConfigError(f'Tensor {name} has shape {file.tensors[name][1]} but config.json implies '
                        f'{expected[name][2]}; the config and the weights do not belong together.')
  temperature_names = {name for name, (path, _, _) in expected.items() if is_temperature(path)}
  present = temperature_names & set(located)
  if present and present != temperature_names:
    raise ConfigError(f'{hf_dir} has scale_param for {len(present)} of {cfg.model.num_layers} layers; '
                      'a head-scale checkpoint has one per layer.')
  return expected


def _at(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def conversion_mesh(cfg):
  """As many devices on the fsdp axis as divide the width: each holds a slice of every matrix."""
  import jax
  from nopejax import sharding
  n = len(jax.devices())
  fsdp = math.gcd(n, cfg.model.embed_dim)
  return jax.make_mesh((n // fsdp, fsdp, 1), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def read_hf_state(cfg, hf_dir, mesh):
  """(model state on `mesh`, {tensor name: stored dtype}) of a Hugging Face directory, checked first.

  Files are read one at a time and, in each, one tensor at a time: each device receives only its
  slice of it (make_array_from_callback), so host memory never holds the model a second time.
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from nopejax import sharding
  from nopejax.model import Transformer

  abstract = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
  shapes = nnx.to_pure_dict(abstract)
  layout = hf_layout(cfg)
  located = checkpoint_files(hf_dir)
  expected = _check_tensors(cfg, layout, shapes, located, hf_dir)
  shardings = nnx.to_pure_dict(sharding.state_shardings(abstract, mesh, cfg.mesh.rules))
  by_file = {}
  for name, file in located.items():
    if name in expected:
      by_file.setdefault(file.path, (file, []))[1].append(name)
  arrays, dtypes = {}, {}
  for file, names in by_file.values():
    for name in sorted(names):
      path, kind, _ = expected[name]
      stored = file.read(name)
      dtypes[name] = _DTYPE_NAMES[stored.dtype.newbyteorder('=')]
      ours = to_nopejax(kind, stored, _at(shapes, path).shape)
      arrays[path] = jax.make_array_from_callback(
          ours.shape, _at(shardings, path), lambda index, ours=ours: np.asarray(ours[index], np.float32))
      del stored, ours
  for path in layout:
    if path not in arrays:  # No scale_param: every temperature is 1.
      arrays[path] = jax.device_put(jnp.ones(_at(shapes, path).shape, jnp.float32), _at(shardings, path))
  state = jax.tree.map(lambda x: x, abstract, is_leaf=lambda v: isinstance(v, nnx.Variable))
  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(
      lambda key_path, _: arrays[tuple(k.key for k in key_path)], shapes))
  return state, dtypes


def from_hf(hf_dir, workdir, nope=False, tokenizer=None, compute_dtype='float32') -> dict:
  """Converts a Hugging Face Llama directory into a new nopejax workdir; returns a summary dict."""
  from nopejax import checkpoint

  config_path = os.path.join(hf_dir, 'config.json')
  if not os.path.isfile(config_path):
    raise ConfigError(f'--hf_dir {hf_dir} has no config.json; point it at a Hugging Face model directory.')
  hf_config = _read_json(config_path)
  nope = nope or bool(hf_config.get('nope'))
  cfg = config_from_hf(hf_config, nope, hf_dir)
  if compute_dtype not in config.DTYPES:
    raise ConfigError(f'--compute_dtype {compute_dtype} is not one of {config.DTYPES}; pick one of those.')
  cfg.model.dtype = compute_dtype
  if tokenizer is None:
    found = os.path.join(hf_dir, 'tokenizer.model')
    tokenizer = found if os.path.isfile(found) else ''
  if tokenizer not in ('', 'byte') and not os.path.isfile(tokenizer):
    raise ConfigError(f"--tokenizer {tokenizer} is not a file; pass a SentencePiece .model file or 'byte'.")
  out = epath.Path(workdir)  # The workdir may be a gs:// URL; the Hugging Face directory is local.
  if out.exists() and any(out.iterdir()):
    raise ConfigError(f'--workdir {workdir} exists and is not empty; convert into a new directory.')
  state, dtypes = read_hf_state(cfg, hf_dir, conversion_mesh(cfg))  # Raises before anything is written.

  out.mkdir(parents=True, exist_ok=True)
  if tokenizer not in ('', 'byte'):
    epath.Path(tokenizer).copy(out / 'tokenizer.model')
    tokenizer = os.fspath((out / 'tokenizer.model').resolve())
  cfg.data.tokenizer = tokenizer
  checkpoint.save_weights(workdir, cfg, state)
  (out / SOURCE_FILE).write_text(json.dumps(
      {'hf_dir': os.path.abspath(hf_dir), 'nope': nope, 'config': hf_config, 'dtypes': dtypes}, indent=1, sort_keys=True))
  (out / 'config.json').write_text(config.to_json(cfg))
  return {'workdir': workdir, 'position': cfg.model.position, 'tensors': len(dtypes),
          'head_scale': any(name.endswith('scale_param') for name in dtypes), 'tokenizer': tokenizer}


# ---------------------------------------------------------------------------------------------
# to-hf


def _source_of(workdir, cfg):
  """The hf_source.json of a converted workdir, or of the base run of a search; None otherwise."""
  for directory in (workdir, cfg.search.base):
    if directory and (epath.Path(directory) / SOURCE_FILE).exists():
      return json.loads((epath.Path(directory) / SOURCE_FILE).read_text())
  return None


def _shard_groups(names_and_bytes, max_bytes):
  """Consecutive groups of names whose sizes add up to at most max_bytes (a bigger tensor alone)."""
  groups, size = [[]], 0
  for name, nbytes in names_and_bytes:
    if groups[-1] and size + nbytes > max_bytes:
      groups.append([])
      size = 0
    groups[-1].append(name)
    size += nbytes
  return groups


def to_hf_dir(workdir, hf_dir, dtype='auto', fold_temperatures=False, max_shard_mb=4096) -> dict:
  """Writes the latest model of a workdir (pretrain or search) as a Hugging Face Llama directory."""
  import jax
  from flax import nnx
  import nopejax

  if os.path.exists(hf_dir) and os.listdir(hf_dir):
    raise ConfigError(f'--hf_dir {hf_dir} exists and is not empty; write into a new directory.')
  if dtype != 'auto' and dtype not in DTYPES:
    raise ConfigError(f"--dtype {dtype} is not one of {('auto',) + tuple(DTYPES)}; pick one of those.")
  model, cfg = nopejax.load(workdir)
  m = cfg.model
  if m.position not in ('nope', 'rope') or m.rope_scaling != 'none' or m.logn or m.llama4_scaling:
    # transformers' Llama would load the weights and silently attend without the bias or the scaling.
    raise ConfigError(f'{workdir} uses model.position={m.position}, rope_scaling={m.rope_scaling}, logn={m.logn}, '
                      f'llama4_scaling={m.llama4_scaling}; only plain NoPE and RoPE models export to Llama.')
  source = _source_of(workdir, cfg)
  source_dtypes = (source or {}).get('dtypes', {})
  pure = nnx.to_pure_dict(nnx.state(model))
  layout = hf_layout(cfg)
  temperatures = {path: np.asarray(jax.device_get(_at(pure, path)), np.float32)
                  for path in layout if is_temperature(path)}
  with_scale_param = not fold_temperatures and (
      any(np.any(t != 1.0) for t in temperatures.values()) or
      any(layout[path][0] in source_dtypes for path in temperatures))

  def hf_float32(path):
    array = np.asarray(jax.device_get(_at(pure, path)), np.float32)
    if fold_temperatures and path[-1] == 'q_DxHxDh':
      array = array * temperatures[path[:-1] + ('temperature',)][None, :, None]
    return np.ascontiguousarray(to_hf(layout[path][1], array))

  def stored_dtype(path):
    """--dtype, or auto: the source checkpoint's dtype where it holds the values exactly, else float32."""
    if dtype != 'auto':
      return np.dtype(DTYPES[dtype])
    name = layout[path][0]
    if name in source_dtypes:
      candidate = np.dtype(_SAFETENSORS_DTYPES[source_dtypes[name]])
      array = hf_float32(path)
      if np.array_equal(array.astype(candidate).astype(np.float32), array):
        return candidate
    return np.dtype(np.float32)

  paths = [p for p in layout if not is_temperature(p) or with_scale_param]
  dtypes = {p: stored_dtype(p) for p in paths}  # One tensor in host memory at a time, here and below.
  sizes = [(p, math.prod(_at(pure, p).shape) * dtypes[p].itemsize) for p in paths]
  groups = _shard_groups(sizes, int(max_shard_mb * 2**20))
  os.makedirs(hf_dir, exist_ok=True)
  weight_map = {}
  for i, group in enumerate(groups):
    file_name = 'model.safetensors' if len(groups) == 1 else f'model-{i + 1:05d}-of-{len(groups):05d}.safetensors'
    write_safetensors(os.path.join(hf_dir, file_name), {layout[p][0]: hf_float32(p).astype(dtypes[p]) for p in group})
    weight_map.update({layout[p][0]: file_name for p in group})
  if len(groups) > 1:
    with open(os.path.join(hf_dir, 'model.safetensors.index.json'), 'w') as f:
      json.dump({'metadata': {'total_size': sum(n for _, n in sizes)}, 'weight_map': weight_map}, f, indent=2, sort_keys=True)
  matrix_dtypes = {str(dtypes[p]) for p in paths if not is_temperature(p)}
  with open(os.path.join(hf_dir, 'config.json'), 'w') as f:
    json.dump(hf_config_of(cfg, source, matrix_dtypes.pop() if len(matrix_dtypes) == 1 else 'float32'), f,
              indent=2, sort_keys=True)
    f.write('\n')
  _copy_tokenizer(cfg, source, hf_dir)
  return {'hf_dir': hf_dir, 'tensors': len(paths), 'files': len(groups), 'scale_param': with_scale_param,
          'folded': fold_temperatures, 'position': cfg.model.position}


_TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'generation_config.json')


def _copy_tokenizer(cfg, source, hf_dir):
  """The run's SentencePiece model as tokenizer.model, and the source's tokenizer files if it had any."""
  if cfg.data.tokenizer not in ('', 'byte') and os.path.isfile(cfg.data.tokenizer):
    shutil.copyfile(cfg.data.tokenizer, os.path.join(hf_dir, 'tokenizer.model'))
  source_dir = (source or {}).get('hf_dir', '')
  for name in _TOKENIZER_FILES:
    if source_dir and os.path.isfile(os.path.join(source_dir, name)):
      shutil.copyfile(os.path.join(source_dir, name), os.path.join(hf_dir, name))


# ---------------------------------------------------------------------------------------------
# Command line.


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m nopejax.convert', description=__doc__.split('\n\n')[0])
  commands = parser.add_subparsers(dest='command', required=True)
  from_parser = commands.add_parser('from-hf', help='a Hugging Face Llama directory -> a new nopejax workdir')
  from_parser.add_argument('--hf_dir', required=True)
  from_parser.add_argument('--workdir', required=True)
  from_parser.add_argument('--nope', action='store_true',
                           help='the checkpoint is NoPE: drop the rotary embedding (its config.json cannot say so)')
  from_parser.add_argument('--tokenizer', default=None,
                           help="SentencePiece .model or 'byte'; default: the checkpoint's tokenizer.model")
  from_parser.add_argument('--compute_dtype', default='float32', help='model.dtype of the run: float32 or bfloat16')
  to_parser = commands.add_parser('to-hf', help='a nopejax workdir (pretrain or search) -> a Hugging Face Llama directory')
  to_parser.add_argument('--workdir', required=True)
  to_parser.add_argument('--hf_dir', required=True)
  to_parser.add_argument('--dtype', default='auto',
                         help="stored dtype: float32, bfloat16, float16, or auto (the source checkpoint's, else float32)")
  to_parser.add_argument('--fold_temperatures', action='store_true',
                         help='multiply q_proj by the temperatures instead of writing scale_param: a plain Llama')
  to_parser.add_argument('--max_shard_mb', type=float, default=4096, help='largest safetensors file, MiB')
  args = parser.parse_args(argv)
  try:
    if args.command == 'from-hf':
      summary = from_hf(args.hf_dir, args.workdir, args.nope, args.tokenizer, args.compute_dtype)
      print(f'Wrote {summary["workdir"]}: {summary["tensors"]} tensors, position {summary["position"]}, '
            f'{"head-scale temperatures" if summary["head_scale"] else "temperatures 1"}, tokenizer '
            f'{summary["tokenizer"] or "none (set --config.data.tokenizer when training or evaluating)"}.')
    else:
      if args.max_shard_mb <= 0:
        raise ConfigError(f'--max_shard_mb {args.max_shard_mb} must be positive; pass e.g. 4096.')
      summary = to_hf_dir(args.workdir, args.hf_dir, args.dtype, args.fold_temperatures, args.max_shard_mb)
      how = 'scale_param' if summary['scale_param'] else 'folded into q_proj' if summary['folded'] else 'none (all 1)'
      print(f'Wrote {summary["hf_dir"]}: {summary["tensors"]} tensors in {summary["files"]} file(s), '
            f'position {summary["position"]}, temperatures: {how}.')
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
