"""The safetensors files of a Hugging Face directory: written and read back bit for bit (bfloat16
included), one file or shards with their index."""
import json
import os
import struct

import ml_dtypes
import numpy as np

from hf_fixtures import FIXTURES
from nopejax import convert
from nopejax.convert import safetensors_files as files


def test_safetensors_written_here_read_back_exactly(tmp_path):
  tensors = {'b.weight': np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
             'a.bf16': (np.arange(6, dtype=np.float32) / 3).astype(ml_dtypes.bfloat16).reshape(2, 3),
             'c.ids': np.array([1, -2, 3], np.int64)}
  path = str(tmp_path / 'x.safetensors')
  convert.write_safetensors(path, tensors)
  with open(path, 'rb') as f:
    (header_size,) = struct.unpack('<Q', f.read(8))
    header = json.loads(f.read(header_size))
  assert header_size % 8 == 0 and header['__metadata__'] == {'format': 'pt'}
  begin, end = header['a.bf16']['data_offsets']
  assert header['a.bf16']['dtype'] == 'BF16' and header['a.bf16']['shape'] == [2, 3] and end - begin == 12
  read = convert.SafetensorsFile(path)
  assert read.tensors == {'a.bf16': ('BF16', (2, 3)), 'b.weight': ('F32', (3, 4)), 'c.ids': ('I64', (3,))}
  for name, array in tensors.items():
    assert read.read(name).dtype == array.dtype and read.read(name).tobytes() == array.tobytes()


def test_shards_and_their_index_read_back_as_one_checkpoint(tmp_path):
  source = convert.checkpoint_files(str(FIXTURES / 'hf_llama'))
  assert len({file.path for file in source.values()}) == 3  # The fixture is sharded with an index.
  names_and_bytes = [(name, source[name].read(name).nbytes) for name in sorted(source)]
  written = str(tmp_path / 'hf')
  os.mkdir(written)
  count = files.write_checkpoint(written, names_and_bytes, lambda name: source[name].read(name), max_shard_mb=0.05)
  index = json.loads((tmp_path / 'hf' / files.INDEX_FILE).read_text())
  assert count > 1 and index['metadata']['total_size'] == sum(n for _, n in names_and_bytes)
  shards = {}
  for name, nbytes in names_and_bytes:
    shards.setdefault(index['weight_map'][name], []).append(nbytes)
  assert len(shards) == count and all(sum(sizes) <= 0.05 * 2**20 or len(sizes) == 1 for sizes in shards.values())
  back = convert.checkpoint_files(written)
  assert sorted(back) == sorted(source)
  for name in source:
    assert back[name].read(name).tobytes() == source[name].read(name).tobytes()
    assert back[name].read(name).dtype == ml_dtypes.bfloat16


def test_one_small_file_needs_no_index(tmp_path):
  count = files.write_checkpoint(str(tmp_path), [('w', 16)], lambda name: np.ones(4, np.float32), max_shard_mb=1)
  assert count == 1 and sorted(os.listdir(tmp_path)) == ['model.safetensors']
  assert convert.checkpoint_files(str(tmp_path))['w'].read('w').tolist() == [1, 1, 1, 1]
