"""A Hugging Face checkpoint's safetensors files: its tensors by name (one file, or shards listed in
model.safetensors.index.json), read one at a time, and the same layout written back.

The `safetensors` package reads and writes the files; with numpy arrays it stores ml_dtypes'
bfloat16 as BF16 and reads BF16 back as ml_dtypes.bfloat16, so a bfloat16 checkpoint round-trips
bit for bit."""
import json
import os

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from nopejax.config import ConfigError

# The floating dtypes a stored weight may have, by their safetensors names.
FLOAT_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16}
INDEX_FILE = 'model.safetensors.index.json'
SINGLE_FILE = 'model.safetensors'
# How a file cloned without git-lfs begins: a pointer in place of the weights.
_LFS_POINTER = b'version https://git-lfs.github.com/spec/'


class SafetensorsFile:
  """One .safetensors file: {name: (safetensors dtype name, shape)} from its header; each tensor
  read when asked, so host memory holds one tensor at a time."""

  def __init__(self, path):
    self.path = path
    try:
      with open(path, 'rb') as f:
        if f.read(len(_LFS_POINTER)) == _LFS_POINTER:
          raise ConfigError(f'{path} is a Git LFS pointer, not the weights it points to; run git lfs pull in '
                            f'{os.path.dirname(path) or "."} (or download with huggingface-cli download).')
      with safetensors.safe_open(path, framework='numpy') as f:
        self.tensors = {name: (f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape())) for name in f.keys()}
    except (OSError, MemoryError, safetensors.SafetensorError) as e:  # MemoryError: a header length of garbage.
      raise ConfigError(f'{path} is not a safetensors file, or is truncated or damaged ({type(e).__name__}: {e}); '
                        'download it again.') from None

  def read(self, name) -> np.ndarray:
    """The tensor as a numpy array of its stored dtype (bfloat16 as ml_dtypes.bfloat16)."""
    try:
      with safetensors.safe_open(self.path, framework='numpy') as f:
        return f.get_tensor(name)
    except (OSError, safetensors.SafetensorError) as e:
      raise ConfigError(f'{self.path} is truncated or damaged at tensor {name} ({type(e).__name__}: {e}); '
                        'download it again.') from e


def write_safetensors(path, tensors: dict) -> None:
  """Writes {name: numpy array} as one safetensors file with the metadata transformers writes."""
  safetensors.numpy.save_file({name: np.ascontiguousarray(array) for name, array in tensors.items()}, path,
                              metadata={'format': 'pt'})


def checkpoint_files(hf_dir) -> dict:
  """{tensor name: SafetensorsFile} of a Hugging Face directory, from its index or its one file."""
  index_path = os.path.join(hf_dir, INDEX_FILE)
  single_path = os.path.join(hf_dir, SINGLE_FILE)
  if os.path.exists(index_path):
    try:
      with open(index_path) as f:
        weight_map = json.load(f)['weight_map']
    except (ValueError, KeyError, TypeError) as e:
      raise ConfigError(f'{index_path} is not a safetensors index ({type(e).__name__}: {e}); download it again.') from None
    files = {name: SafetensorsFile(os.path.join(hf_dir, name)) for name in sorted(set(weight_map.values()))}
    located = {name: files[file_name] for name, file_name in weight_map.items()}
  elif os.path.exists(single_path):
    single = SafetensorsFile(single_path)
    located = {name: single for name in single.tensors}
  else:
    bins = [n for n in os.listdir(hf_dir) if n.endswith('.bin')]
    hint = ' (it has PyTorch .bin files: save their state dict as safetensors first, the README shows how)' if bins else ''
    raise ConfigError(f'--hf_dir {hf_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}; '
                      'point it at a Hugging Face model directory.')
  for name, file in located.items():
    if name not in file.tensors:
      raise ConfigError(f'{file.path} lacks tensor {name} that {INDEX_FILE} places there; '
                        'download the checkpoint again.')
  return located


def shard_groups(names_and_bytes, max_bytes) -> list[list]:
  """Consecutive groups of names whose sizes add up to at most max_bytes (a bigger tensor alone)."""
  groups, size = [[]], 0
  for name, nbytes in names_and_bytes:
    if groups[-1] and size + nbytes > max_bytes:
      groups.append([])
      size = 0
    groups[-1].append(name)
    size += nbytes
  return groups


def write_checkpoint(hf_dir, names_and_bytes, tensor_of, max_shard_mb) -> int:
  """Writes the tensors {name: tensor_of(name)} in the order given, as model.safetensors or as shards
  of at most max_shard_mb MiB with their index; each shard's tensors are made only while it is
  written. Returns the number of files."""
  groups = shard_groups(names_and_bytes, int(max_shard_mb * 2**20))
  weight_map = {}
  for i, group in enumerate(groups):
    file_name = SINGLE_FILE if len(groups) == 1 else f'model-{i + 1:05d}-of-{len(groups):05d}.safetensors'
    write_safetensors(os.path.join(hf_dir, file_name), {name: tensor_of(name) for name in group})
    weight_map.update({name: file_name for name in group})
  if len(groups) > 1:
    with open(os.path.join(hf_dir, INDEX_FILE), 'w') as f:
      json.dump({'metadata': {'total_size': sum(n for _, n in names_and_bytes)}, 'weight_map': weight_map}, f,
                indent=2, sort_keys=True)
  return len(groups)
