"""Hugging Face Llama directories <-> nopejax workdirs.

from_hf reads config.json and the safetensors weights (one file, or shards listed in
model.safetensors.index.json) one shard at a time, placing each tensor straight onto a mesh over
every device (split along the width, so no device holds a whole copy) and writes OUT/config.json
and a weights-only orbax checkpoint: `nopejax.load`, `evaluate`, the search (`search.base=OUT`)
and training resumed in OUT (continued pretraining, fresh optimizer) all read it.
Per-head scales stored as `model.layers.{i}.self_attn.scale_param` (the authors' head-scale
models) become the temperatures: their code multiplies q by scale_param / sqrt(head_dim) and then
runs attention with scale 1, which is nopejax's q * c_h followed by the usual 1 / sqrt(d).

to_hf_dir writes config.json and safetensors that transformers loads with no custom code: a NoPE
or hybrid model as a SmolLM3 (smollm3.py: per-layer `no_rope_layers`, temperatures folded into
q_proj), a RoPE model as a Llama. layout='llama' writes a NoPE model as the paper's Llama, its
temperatures as scale_param (the published head-scale format) or folded with fold_temperatures.
SmolLM3 directories (from_hf) come in as NoPE, RoPE or hybrid models.
"""
import json
import math
import os
import shutil

import ml_dtypes
import numpy as np
from etils import epath

from nopejax import config
from nopejax.config import ConfigError
from nopejax.convert import safetensors_files, smollm3
from nopejax.convert.layout import (
    IGNORED_SUFFIXES, at, config_from_hf, hf_config_of, hf_layout, hf_shape, is_temperature, to_hf, to_nopejax)

DTYPES = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16, 'float16': np.float16}  # to_hf_dir's dtype choices.

SOURCE_FILE = 'hf_source.json'  # In a converted workdir: the source directory, config.json and dtypes.


def _read_json(path):
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:  # Cut off by an interrupted download, or not JSON at all.
    raise ConfigError(f'{path} is not valid JSON ({e}); download it again.') from None


def _check_tensors(cfg, layout, shapes, located, hf_dir):
  """{HF name: (our path, kind, HF shape)} once every tensor the model needs is there with its
  shape and nothing the model cannot use is."""
  expected = {}
  for path, (name, kind) in layout.items():
    expected[name] = (path, kind, hf_shape(kind, at(shapes, path).shape))
  needed = {name for name, (path, _, _) in expected.items() if not is_temperature(path)}
  missing = sorted(needed - set(located))
  if missing:
    raise ConfigError(f'{hf_dir} lacks tensor {missing[0]} ({len(missing)} missing) that a Llama of its '
                      'config.json has; check the download or the config.')
  ignored = {n for n in located if n.endswith(IGNORED_SUFFIXES)}
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
  located = safetensors_files.checkpoint_files(hf_dir)
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
      dtypes[name] = file.tensors[name][0]
      ours = to_nopejax(kind, stored, at(shapes, path).shape)
      arrays[path] = jax.make_array_from_callback(
          ours.shape, at(shardings, path), lambda index, ours=ours: np.asarray(ours[index], np.float32))
      del stored, ours
  for path in layout:
    if path not in arrays:  # No scale_param: every temperature is 1.
      arrays[path] = jax.device_put(jnp.ones(at(shapes, path).shape, jnp.float32), at(shardings, path))
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
  checkpoint.check_writable(workdir)
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
  return {'workdir': workdir, 'position': cfg.model.position, 'rope_layers': cfg.model.rope_layers,
          'tensors': len(dtypes), 'head_scale': any(name.endswith('scale_param') for name in dtypes), 'tokenizer': tokenizer}


def _source_of(workdir, cfg):
  """The hf_source.json of a converted workdir, or of the base run of a search; None otherwise."""
  for directory in (workdir, cfg.search.base):
    if directory and (epath.Path(directory) / SOURCE_FILE).exists():
      return json.loads((epath.Path(directory) / SOURCE_FILE).read_text())
  return None


def to_hf_dir(workdir, hf_dir, dtype='auto', fold_temperatures=False, max_shard_mb=4096, layout='auto') -> dict:
  """Writes the latest model of a workdir (pretrain or search) as a Hugging Face directory: a SmolLM3
  (layout 'smollm3', temperatures folded into q_proj) or a Llama ('llama'); 'auto': smollm3 unless
  every layer uses RoPE (smollm3.resolve_layout)."""
  import jax
  from flax import nnx
  import nopejax

  from nopejax import checkpoint
  checkpoint.check_writable(hf_dir, '--hf_dir')
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
  if m.temperature_schedule != 'constant':
    # A Llama (and scale_param) holds one scale per head: the log schedule's slopes and octaves, or
    # ssmax's growth with ln i, would be dropped and the model would attend differently past L.
    raise ConfigError(f"{workdir} uses model.temperature_schedule={m.temperature_schedule!r}, whose temperatures "
                      "change with position, but a Llama holds one constant scale per head; export a run searched "
                      "with model.temperature_schedule='constant', or evaluate this one with python -m nopejax.evaluate.")
  architecture = smollm3.resolve_layout(cfg, layout, workdir)  # ('layout' below: the tensors' names.)
  fold_temperatures = fold_temperatures or architecture == 'smollm3'  # SmolLM3 has no place for scale_param.
  source = _source_of(workdir, cfg)
  source_dtypes = (source or {}).get('dtypes', {})
  pure = nnx.to_pure_dict(nnx.state(model))
  layout = hf_layout(cfg)
  temperatures = {path: np.asarray(jax.device_get(at(pure, path)), np.float32)
                  for path in layout if is_temperature(path)}
  with_scale_param = not fold_temperatures and (
      any(np.any(t != 1.0) for t in temperatures.values()) or
      any(layout[path][0] in source_dtypes for path in temperatures))

  def hf_float32(path):
    array = np.asarray(jax.device_get(at(pure, path)), np.float32)
    if fold_temperatures and path[-1] == 'q_DxHxDh':
      array = array * temperatures[path[:-1] + ('temperature',)][None, :, None]
    return np.ascontiguousarray(to_hf(layout[path][1], array))

  def stored_dtype(path):
    """--dtype, or auto: the source checkpoint's dtype where it holds the values exactly, else float32."""
    if dtype != 'auto':
      return np.dtype(DTYPES[dtype])
    name = layout[path][0]
    if name in source_dtypes:
      candidate = np.dtype(safetensors_files.FLOAT_DTYPES.get(source_dtypes[name], np.float32))
      array = hf_float32(path)
      if np.array_equal(array.astype(candidate).astype(np.float32), array):
        return candidate
    return np.dtype(np.float32)

  paths = [p for p in layout if not is_temperature(p) or with_scale_param]
  dtypes = {p: stored_dtype(p) for p in paths}  # One tensor in host memory at a time, here and below.
  path_of = {layout[p][0]: p for p in paths}
  names_and_bytes = [(name, math.prod(at(pure, p).shape) * dtypes[p].itemsize) for name, p in path_of.items()]
  os.makedirs(hf_dir, exist_ok=True)
  file_count = safetensors_files.write_checkpoint(
      hf_dir, names_and_bytes, lambda name: hf_float32(path_of[name]).astype(dtypes[path_of[name]]), max_shard_mb)
  matrix_dtypes = {str(dtypes[p]) for p in paths if not is_temperature(p)}
  with open(os.path.join(hf_dir, 'config.json'), 'w') as f:
    config_of = smollm3.hf_config_of if architecture == 'smollm3' else hf_config_of
    json.dump(config_of(cfg, source, matrix_dtypes.pop() if len(matrix_dtypes) == 1 else 'float32'), f,
              indent=2, sort_keys=True)
    f.write('\n')
  _copy_tokenizer(cfg, source, hf_dir)
  return {'hf_dir': hf_dir, 'tensors': len(paths), 'files': file_count, 'scale_param': with_scale_param,
          'folded': fold_temperatures, 'position': cfg.model.position, 'rope_layers': cfg.model.rope_layers,
          'layout': architecture}


_TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'generation_config.json')


def _copy_tokenizer(cfg, source, hf_dir):
  """The run's SentencePiece model as tokenizer.model, and the source's tokenizer files if it had any."""
  if cfg.data.tokenizer not in ('', 'byte') and os.path.isfile(cfg.data.tokenizer):
    shutil.copyfile(cfg.data.tokenizer, os.path.join(hf_dir, 'tokenizer.model'))
  source_dir = (source or {}).get('hf_dir', '')
  for name in _TOKENIZER_FILES:
    if source_dir and os.path.isfile(os.path.join(source_dir, name)):
      shutil.copyfile(os.path.join(source_dir, name), os.path.join(hf_dir, name))
