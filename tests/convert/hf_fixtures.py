"""The Hugging Face Llama fixtures the convert tests read (written by tests/fixtures/make_hf_llama.py),
and changed copies of them."""
import json
import pathlib

from nopejax import convert

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / 'fixtures'


def hf_copy(tmp_path, source='hf_llama', config_changes=None, drop=(), add=None):
  """A copy of a fixture as one safetensors file, with config.json or tensors changed."""
  out = tmp_path / 'changed'
  out.mkdir()
  hf_config = json.loads((FIXTURES / source / 'config.json').read_text())
  hf_config.update(config_changes or {})
  (out / 'config.json').write_text(json.dumps(hf_config))
  files = convert.checkpoint_files(str(FIXTURES / source))
  tensors = {n: f.read(n) for n, f in files.items() if n not in drop}
  tensors.update(add or {})
  convert.write_safetensors(str(out / 'model.safetensors'), tensors)
  return str(out)
