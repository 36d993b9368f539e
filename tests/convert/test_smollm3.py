"""SmolLM3 directories <-> nopejax workdirs, against transformers itself: fixtures written by
tests/fixtures/make_hf_smollm3.py (random tiny SmolLM3ForCausalLMs, a hybrid and an all-NoPE one, their
float32 logits, and the to-hf export of a NoPE model with temperatures that transformers loaded unpatched)."""
import importlib.util
import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nopejax
from hf_fixtures import FIXTURES, hf_copy
from nopejax import convert
from nopejax.config import ConfigError

LOGITS = np.load(FIXTURES / 'hf_smollm3_logits.npz')
_spec = importlib.util.spec_from_file_location('make_hf_smollm3', FIXTURES / 'make_hf_smollm3.py')
make_hf_smollm3 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_hf_smollm3)


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """{'hybrid': workdir, 'nope': workdir}: the two SmolLM3 fixtures converted once, as `from-hf` does."""
  root = tmp_path_factory.mktemp('smollm3')
  workdirs = {name: str(root / name) for name in ('hybrid', 'nope')}
  for name, workdir in workdirs.items():
    convert.from_hf(str(FIXTURES / f'hf_smollm3_{name}'), workdir, tokenizer='byte')
  return workdirs


def logits_of(workdir, chunked=True):
  """(training forward, chunked evaluation forward or None) logits on the fixture tokens."""
  model, _ = nopejax.load(workdir)
  tokens = jnp.asarray(LOGITS['tokens'])
  full = np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens))
  return full, np.asarray(nnx.jit(lambda m, t: m.head(m.forward_chunked(t, 8)[0]))(model, tokens)) if chunked else None


@pytest.mark.parametrize('name', ['hybrid', 'nope'])
def test_converted_model_matches_transformers_logits(converted, name):
  full, chunked = logits_of(converted[name])
  np.testing.assert_allclose(full, LOGITS[name], atol=1e-4, rtol=0)
  np.testing.assert_allclose(chunked, LOGITS[name], atol=1e-4, rtol=0)


def test_no_rope_layers_become_the_per_layer_positions(converted):
  _, cfg = nopejax.load(converted['hybrid'])
  assert (cfg.model.position, cfg.model.rope_layers, cfg.model.rope_theta) == ('rope', '1,1,1,0', 1000.0)
  assert not cfg.model.tie_embeddings and cfg.model.num_layers == 4
  _, cfg = nopejax.load(converted['nope'])
  assert (cfg.model.position, cfg.model.rope_layers) == ('nope', '') and cfg.model.tie_embeddings
  assert cfg.model.norm_eps == 1e-6


def test_hybrid_round_trips_through_to_hf_byte_for_byte(converted, tmp_path):
  out = tmp_path / 'hf'
  summary = convert.to_hf_dir(converted['hybrid'], str(out))
  assert summary['layout'] == 'smollm3' and not summary['scale_param']
  source, written = convert.checkpoint_files(str(FIXTURES / 'hf_smollm3_hybrid')), convert.checkpoint_files(str(out))
  assert sorted(written) == sorted(source)
  for tensor in source:
    a, b = source[tensor].read(tensor), written[tensor].read(tensor)
    assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), tensor
  source_config = json.loads((FIXTURES / 'hf_smollm3_hybrid' / 'config.json').read_text())
  written_config = json.loads((out / 'config.json').read_text())
  assert {k: written_config[k] for k in source_config} == source_config
  convert.from_hf(str(out), str(tmp_path / 'back'), tokenizer='byte')
  np.testing.assert_allclose(logits_of(str(tmp_path / 'back'), chunked=False)[0], LOGITS['hybrid'], atol=1e-4, rtol=0)


def test_nope_workdir_exports_the_files_transformers_loaded_unpatched(tmp_path):
  """A NoPE model with per-head temperatures exports as a SmolLM3 (temperatures folded into q_proj)
  whose files are the ones transformers was run on, and transformers' logits of them are nopejax's."""
  out = tmp_path / 'exported'
  workdir = make_hf_smollm3.export_with_temperatures(FIXTURES / 'hf_smollm3_nope', str(tmp_path / 'runs'), out)
  recorded = json.loads((FIXTURES / 'hf_smollm3_exported.json').read_text())
  ours = make_hf_smollm3.manifest(out)
  assert ours['config'] == recorded['config']
  assert ours['tensors'] == recorded['tensors']
  assert not any('scale_param' in name for name in ours['tensors'])
  full, chunked = logits_of(workdir)
  np.testing.assert_allclose(full, LOGITS['exported'], atol=1e-4, rtol=0)
  np.testing.assert_allclose(chunked, LOGITS['exported'], atol=1e-4, rtol=0)
  assert np.abs(LOGITS['exported'] - LOGITS['nope']).max() > 0.1  # The temperatures count.

  # The paper's Llama layout stays available: scale_param, and the `nope` marker.
  llama = tmp_path / 'llama'
  assert convert.to_hf_dir(workdir, str(llama), layout='llama')['scale_param']
  llama_config = json.loads((llama / 'config.json').read_text())
  assert llama_config['model_type'] == 'llama' and llama_config['nope'] is True
  assert 'model.layers.1.self_attn.scale_param' in convert.checkpoint_files(str(llama))


def test_temperatures_on_rope_layers_fold_into_q_proj(converted, tmp_path):
  """On a RoPE layer a temperature is a q scale, which commutes with the rotation: folded, the
  hybrid computes what it computed with temperatures."""
  from nopejax import checkpoint, config
  model, cfg = nopejax.load(converted['hybrid'])
  for i, block in enumerate(model.blocks):
    block.attention.temperature[...] = jnp.array([1.0, 1.3, 1.6, 2.0]) + 0.1 * i
  workdir = tmp_path / 'with_temperatures'
  checkpoint.save_weights(str(workdir), cfg, nnx.state(model))
  (workdir / 'config.json').write_text(config.to_json(cfg))
  convert.to_hf_dir(str(workdir), str(tmp_path / 'hf'))
  convert.from_hf(str(tmp_path / 'hf'), str(tmp_path / 'back'), tokenizer='byte')
  back, _ = nopejax.load(str(tmp_path / 'back'))
  assert all(np.all(block.attention.temperature[...] == 1.0) for block in back.blocks)
  with_temperatures = logits_of(str(workdir), chunked=False)[0]
  assert np.abs(with_temperatures - LOGITS['hybrid']).max() > 0.1
  np.testing.assert_allclose(logits_of(str(tmp_path / 'back'), chunked=False)[0], with_temperatures, atol=1e-4, rtol=0)


def test_layouts_by_position(converted, tmp_path):
  """auto: SmolLM3 for NoPE and hybrids; a hybrid has no Llama layout; a RoPE model as SmolLM3 flags every layer."""
  with pytest.raises(ConfigError, match="is a hybrid .* export it with --layout=smollm3"):
    convert.to_hf_dir(converted['hybrid'], str(tmp_path / 'llama'), layout='llama')
  with pytest.raises(ConfigError, match=r"--layout gpt is not one of \('auto', 'smollm3', 'llama'\)"):
    convert.to_hf_dir(converted['hybrid'], str(tmp_path / 'gpt'), layout='gpt')
  assert not (tmp_path / 'llama').exists() and not (tmp_path / 'gpt').exists()
  rope_source = tmp_path / 'rope_source'
  convert.from_hf(hf_copy(tmp_path, 'hf_smollm3_hybrid', {'no_rope_layers': [1, 1, 1, 1]}), str(rope_source),
                  tokenizer='byte')
  assert convert.to_hf_dir(str(rope_source), str(tmp_path / 'as_llama'))['layout'] == 'llama'
  convert.to_hf_dir(str(rope_source), str(tmp_path / 'as_smollm3'), layout='smollm3')
  assert json.loads((tmp_path / 'as_smollm3' / 'config.json').read_text())['no_rope_layers'] == [1, 1, 1, 1]


def test_checkpoints_record_each_layers_position(converted, tmp_path):
  """The meta holds the flags ('every:4' recorded as its list); a config with other flags is refused."""
  from nopejax import checkpoint
  assert checkpoint.read_meta(converted['hybrid'], 0)['model']['rope_layers'] == '1,1,1,0'
  for rope_layers, ok in (('every:4', True), ('', False), ('1,1,0,1', False)):
    workdir = tmp_path / f'layers_{rope_layers}'
    shutil.copytree(converted['hybrid'], workdir)
    saved = json.loads((workdir / 'config.json').read_text())
    saved['model']['rope_layers'] = rope_layers
    (workdir / 'config.json').write_text(json.dumps(saved))
    if ok:
      nopejax.load(str(workdir))
    else:
      with pytest.raises(ConfigError, match=f"holds a model with model.rope_layers=1,1,1,0 but the config asks for "
                                            f"{rope_layers}; set --config.model.rope_layers=1,1,1,0"):
        nopejax.load(str(workdir))


@pytest.mark.parametrize('changes, message', [
    ({'use_sliding_window': True, 'sliding_window': 8, 'layer_types': ['full_attention'] * 3 + ['sliding_attention']},
     'use_sliding_window=true, which nopejax cannot express'),
    ({'no_rope_layers': [1, 1, 2, 0]}, r'no_rope_layers=\[1, 1, 2, 0\], not one 0 or 1 per layer of its 4'),
    ({'no_rope_layers': [1, 0]}, r'no_rope_layers=\[1, 0\], not one 0 or 1 per layer of its 4'),
    ({'rope_parameters': {'rope_type': 'yarn', 'factor': 4.0, 'rope_theta': 1000.0}}, "RoPE scaling 'yarn'")])
def test_configs_nopejax_cannot_express_are_refused(tmp_path, changes, message):
  with pytest.raises(ConfigError, match=message):
    convert.from_hf(hf_copy(tmp_path, 'hf_smollm3_hybrid', changes), str(tmp_path / 'w'), tokenizer='byte')
  assert not (tmp_path / 'w').exists()


def test_interval_without_flags_is_read_as_transformers_reads_it(tmp_path):
  hf_dir = pathlib.Path(hf_copy(tmp_path, 'hf_smollm3_hybrid', {'no_rope_layer_interval': 2}))
  hf_config = json.loads((hf_dir / 'config.json').read_text())
  del hf_config['no_rope_layers']
  assert convert.config_from_hf(hf_config, False, str(hf_dir)).model.rope_layers == '1,0,1,0'
  with pytest.raises(ConfigError, match='--nope is for Llama checkpoints'):
    convert.config_from_hf(hf_config, True, str(hf_dir))
