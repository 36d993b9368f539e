"""from_hf and to_hf_dir against transformers itself: fixtures written by tests/fixtures/make_hf_llama.py
(random tiny LlamaForCausalLMs saved with save_pretrained, and their float32 logits)."""
import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nopejax
from conftest import small_config
from hf_fixtures import FIXTURES, hf_copy
from nopejax import checkpoint, config, convert, data, loop
from nopejax.config import ConfigError

LOGITS = np.load(FIXTURES / 'hf_llama_logits.npz')
SOURCES = {'rope': ('hf_llama', False), 'nope': ('hf_llama', True), 'headscale': ('hf_llama_headscale', True)}


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """{fixture name: workdir}: the three fixtures converted once, as `from-hf` does."""
  root = tmp_path_factory.mktemp('converted')
  workdirs = {}
  for name, (hf_dir, nope) in SOURCES.items():
    workdirs[name] = str(root / name)
    convert.from_hf(str(FIXTURES / hf_dir), workdirs[name], nope=nope, tokenizer='byte')
  return workdirs


def logits_of(workdir):
  """(logits of the training forward, logits of the chunked evaluation forward) on the fixture tokens."""
  model, _ = nopejax.load(workdir)
  tokens = jnp.asarray(LOGITS['tokens'])
  full = nnx.jit(lambda m, t: m(t))(model, tokens)
  chunked = nnx.jit(lambda m, t: m.head(m.forward_chunked(t, 8)[0]))(model, tokens)
  return np.asarray(full), np.asarray(chunked)


@pytest.mark.parametrize('name', ['rope', 'nope', 'headscale'])
def test_converted_model_matches_transformers_logits(converted, name):
  full, chunked = logits_of(converted[name])
  np.testing.assert_allclose(full, LOGITS[name], atol=1e-4, rtol=0)
  np.testing.assert_allclose(chunked, LOGITS[name], atol=1e-4, rtol=0)


@pytest.mark.parametrize('kernel', ['chunked', 'splash'])
def test_rope_is_applied_before_every_attention_kernel(converted, tmp_path, kernel):
  """The training path with packed-document segment ids, through the flash and splash kernels."""
  workdir = str(tmp_path / kernel)
  shutil.copytree(converted['rope'], workdir)
  saved = json.loads(pathlib.Path(workdir, 'config.json').read_text())
  saved['model'].update(attention_impl=kernel, attention_block=16)
  pathlib.Path(workdir, 'config.json').write_text(json.dumps(saved))
  model, _ = nopejax.load(workdir)
  tokens = jnp.asarray(LOGITS['tokens'])
  logits = nnx.jit(lambda m, t: m(t, jnp.ones_like(t)))(model, tokens)
  np.testing.assert_allclose(logits, LOGITS['rope'], atol=1e-4, rtol=0)


def test_config_and_head_scales_are_honoured(converted):
  model, cfg = nopejax.load(converted['headscale'])
  assert cfg.model.tie_embeddings and cfg.model.norm_eps == 1e-6 and cfg.model.position == 'nope'
  assert (cfg.model.num_heads, cfg.model.num_kv_heads, cfg.model.head_dim) == (4, 2, 16)
  stored = convert.checkpoint_files(str(FIXTURES / 'hf_llama_headscale'))
  for i, block in enumerate(model.blocks):
    name = f'model.layers.{i}.self_attn.scale_param'
    np.testing.assert_array_equal(block.attention.temperature[...], stored[name].read(name).astype(np.float32))
  _, cfg = nopejax.load(converted['rope'])
  assert cfg.model.position == 'rope' and cfg.model.rope_theta == 1000.0 and not cfg.model.tie_embeddings
  assert cfg.data.seq_len == 64 and cfg.data.tokenizer == 'byte'


def test_tensors_go_onto_the_mesh_split_along_the_width():
  cfg = convert.config_from_hf(json.loads((FIXTURES / 'hf_llama' / 'config.json').read_text()), False, 'x')
  mesh = convert.conversion_mesh(cfg)
  assert dict(mesh.shape) == {'data': 1, 'fsdp': 8, 'tensor': 1}
  state, dtypes = convert.read_hf_state(cfg, str(FIXTURES / 'hf_llama'), mesh)
  assert set(dtypes.values()) == {'BF16'} and len(dtypes) == 21
  q = state['blocks'][0]['attention']['q_DxHxDh'][...]
  assert q.dtype == jnp.float32 and len(q.sharding.device_set) == 8
  assert {shard.data.shape for shard in q.addressable_shards} == {(8, 4, 16)}  # 64 / 8 of the width each.


@pytest.mark.parametrize('name', ['rope', 'headscale'])
def test_from_hf_then_to_hf_reproduces_every_tensor(converted, tmp_path, name):
  source_dir = FIXTURES / SOURCES[name][0]
  out = str(tmp_path / 'hf')
  summary = convert.to_hf_dir(converted[name], out, max_shard_mb=0.05, layout='llama')  # NoPE defaults to SmolLM3.
  assert summary['files'] > 1 and os.path.exists(os.path.join(out, 'model.safetensors.index.json'))
  source, written = convert.checkpoint_files(str(source_dir)), convert.checkpoint_files(out)
  assert sorted(written) == sorted(source)
  for tensor in source:
    a, b = source[tensor].read(tensor), written[tensor].read(tensor)
    assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), tensor
  source_config = json.loads((source_dir / 'config.json').read_text())
  written_config = json.loads(pathlib.Path(out, 'config.json').read_text())
  assert {k: written_config[k] for k in source_config} == source_config
  assert written_config.get('nope', False) == (name == 'headscale')


def test_folded_temperatures_make_a_plain_llama_of_the_head_scale_model(converted, tmp_path):
  out = str(tmp_path / 'folded')
  convert.to_hf_dir(converted['headscale'], out, dtype='float32', fold_temperatures=True)
  written = convert.checkpoint_files(out)
  assert not any('scale_param' in n for n in written)
  assert all(f.read(n).dtype == np.float32 for n, f in written.items())
  convert.from_hf(out, str(tmp_path / 'back'), tokenizer='byte')  # Its config.json says nope.
  model, _ = nopejax.load(str(tmp_path / 'back'))
  assert all(np.all(block.attention.temperature[...] == 1.0) for block in model.blocks)
  np.testing.assert_allclose(logits_of(str(tmp_path / 'back'))[0], LOGITS['headscale'], atol=1e-4, rtol=0)


def test_converted_workdir_trains_on_and_is_a_search_base(converted, tfds_dir, tmp_path):
  """Continued pretraining resumes in the converted workdir (fresh optimizer, its weights); a search
  starts from it with search.base."""
  workdir = str(tmp_path / 'continued')
  shutil.copytree(converted['nope'], workdir)
  cfg = config.load_json(os.path.join(workdir, 'config.json'))
  cfg.data.tfds_dir, cfg.data.seq_len = tfds_dir, 16
  cfg.train.steps, cfg.train.batch_size, cfg.train.warmup_steps = 2, 8, 0
  cfg.train.eval_every, cfg.train.peak_flops_per_device = 0, 1e9
  cfg.train.learning_rate = 0.0  # Then the weights after two steps are the converted ones, exactly.
  logged = loop.run(cfg, workdir)
  assert logged['step'] == 2 and np.isfinite(logged['loss'])
  assert checkpoint.latest_step(workdir) == 2
  trained, _ = nopejax.load(workdir)
  original, _ = nopejax.load(converted['nope'])
  jax.tree.map(np.testing.assert_array_equal, nnx.state(trained), nnx.state(original))

  search_cfg = small_config(tfds_dir)
  for key in ('vocab_size', 'num_layers', 'embed_dim', 'num_heads', 'num_kv_heads', 'head_dim', 'mlp_dim', 'norm_eps'):
    search_cfg.model[key] = cfg.model[key]
  search_cfg.train.trainable, search_cfg.search.base, search_cfg.search.init = 'temperature', converted['nope'], '1.5'
  search_cfg.train.steps, search_cfg.train.warmup_steps, search_cfg.train.learning_rate = 2, 0, 0.1
  search_dir = str(tmp_path / 'search')
  loop.run(search_cfg, search_dir)
  searched, _ = nopejax.load(search_dir)
  np.testing.assert_array_equal(searched.blocks[1].mlp.up_DxF[...], original.blocks[1].mlp.up_DxF[...])
  assert not np.allclose(searched.blocks[0].attention.temperature[...], 1.0)


@pytest.mark.parametrize('changes, message', [
    (dict(config_changes={'attention_bias': True}), 'attention_bias=true, which nopejax cannot express'),
    (dict(config_changes={'hidden_act': 'gelu'}), "hidden_act='gelu', which nopejax cannot express"),
    (dict(config_changes={'model_type': 'mistral'}), "model_type='mistral', which nopejax cannot express"),
    (dict(config_changes={'rope_parameters': {'rope_type': 'llama3', 'factor': 8.0, 'rope_theta': 1e4}}),
     "RoPE scaling 'llama3', which nopejax cannot express"),
    (dict(config_changes={'hidden_size': 128}), 'Tensor lm_head.weight has shape (256, 64) but config.json implies (256, 128)'),
    (dict(drop=('model.layers.1.self_attn.k_proj.weight',)), 'lacks tensor model.layers.1.self_attn.k_proj.weight'),
    (dict(add={'model.layers.0.self_attn.q_proj.bias': np.zeros(64, np.float32)}),
     'has tensor model.layers.0.self_attn.q_proj.bias that a Llama without biases'),
    (dict(add={'model.layers.0.self_attn.scale_param': np.ones(4, np.float32)}), 'has scale_param for 1 of 2 layers'),
])
def test_unsupported_checkpoints_are_one_sentence_and_write_nothing(tmp_path, changes, message):
  hf_dir = hf_copy(tmp_path, **changes)
  workdir = tmp_path / 'out'
  with pytest.raises(ConfigError, match=message.replace('(', r'\(').replace(')', r'\)')):
    convert.from_hf(hf_dir, str(workdir), tokenizer='byte')
  assert not workdir.exists()


def test_scaled_rope_converts_when_the_rotation_is_dropped(tmp_path):
  hf_dir = hf_copy(tmp_path, config_changes={'rope_scaling': {'type': 'linear', 'factor': 2.0}})
  convert.from_hf(hf_dir, str(tmp_path / 'out'), nope=True, tokenizer='byte')


def test_workdir_configs_continue_or_search_a_converted_model(converted):
  """configs/workdir.py:DIR and configs/workdir_search.py:DIR, as `--config` takes them."""
  def load(name):
    return config.from_file(f'configs/{name}:{converted["headscale"]}')

  continued = load('workdir.py')
  config.validate(continued)
  assert continued.model.tie_embeddings and continued.train.trainable == 'model' and continued.data.seq_len == 64
  search = load('workdir_search.py')
  config.validate(search)
  assert search.search.base == converted['headscale'] and search.search.init == 'auto'
  assert search.train.trainable == 'temperature' and search.train.learning_rate == 0.1 and search.data.seq_len == 256
  assert search.model.tie_embeddings and search.model.norm_eps == 1e-6


def test_the_checkpoints_sentencepiece_model_becomes_the_runs_tokenizer(tmp_path):
  sentencepiece = pytest.importorskip('sentencepiece')
  hf_dir = pathlib.Path(hf_copy(tmp_path))
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text('\n'.join(f'the quick brown fox {i} jumps over the lazy dog' for i in range(100)))
  sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(hf_dir / 'tokenizer'),
                                           vocab_size=50, minloglevel=2)
  workdir = tmp_path / 'run'
  convert.from_hf(str(hf_dir), str(workdir))
  cfg = config.load_json(str(workdir / 'config.json'))
  assert cfg.data.tokenizer == str(workdir / 'tokenizer.model')
  assert (workdir / 'tokenizer.model').read_bytes() == (hf_dir / 'tokenizer.model').read_bytes()
  assert data.make_tokenizer(cfg).vocab_size == 50
  convert.to_hf_dir(str(workdir), str(tmp_path / 'back'))
  assert (tmp_path / 'back' / 'tokenizer.model').read_bytes() == (hf_dir / 'tokenizer.model').read_bytes()


def test_models_with_a_bias_or_a_scaling_do_not_export_to_llama(converted, tmp_path):
  """transformers' Llama would attend without a RoPE scaling (or ALiBi's bias): refused, nothing written."""
  workdir = tmp_path / 'yarn'
  shutil.copytree(converted['rope'], workdir)
  saved = json.loads((workdir / 'config.json').read_text())
  saved['model']['rope_scaling'] = 'yarn'
  (workdir / 'config.json').write_text(json.dumps(saved))
  with pytest.raises(ConfigError, match='rope_scaling=yarn.*only plain NoPE and RoPE models export to Llama'):
    convert.to_hf_dir(str(workdir), str(tmp_path / 'hf'))
  assert not (tmp_path / 'hf').exists()


def test_unreadable_weights_are_refused_and_write_nothing(tmp_path):
  bins = tmp_path / 'bins'
  bins.mkdir()
  shutil.copy(FIXTURES / 'hf_llama' / 'config.json', bins)
  (bins / 'pytorch_model.bin').write_bytes(b'x')
  with pytest.raises(ConfigError, match='PyTorch .bin files: save their state dict as safetensors first'):
    convert.from_hf(str(bins), str(tmp_path / 'w'))
  damaged = pathlib.Path(hf_copy(tmp_path))
  data = (damaged / 'model.safetensors').read_bytes()
  (damaged / 'model.safetensors').write_bytes(data[:len(data) // 2])
  with pytest.raises(ConfigError, match='is truncated or damaged'):
    convert.from_hf(str(damaged), str(tmp_path / 'w'), tokenizer='byte')
  assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize('schedule', ['log', 'ssmax'])
def test_position_dependent_temperatures_do_not_export_to_llama(converted, tmp_path, schedule):
  """A Llama holds one scale per head: the log schedule's slopes or ssmax's ln i would be dropped."""
  workdir = tmp_path / schedule
  shutil.copytree(converted['headscale'], workdir)
  saved = json.loads((workdir / 'config.json').read_text())
  saved['model'].update(temperature_schedule=schedule, temperature_length=64)
  (workdir / 'config.json').write_text(json.dumps(saved))
  with pytest.raises(ConfigError, match=f"uses model.temperature_schedule='{schedule}', whose temperatures change with "
                                        "position, but a Llama holds one constant scale per head; export a run searched "
                                        "with model.temperature_schedule='constant'"):
    convert.to_hf_dir(str(workdir), str(tmp_path / 'hf'), fold_temperatures=schedule == 'ssmax')
  assert not (tmp_path / 'hf').exists()


def test_a_git_lfs_pointer_or_a_cut_off_config_is_one_sentence(tmp_path):
  hf_dir = pathlib.Path(hf_copy(tmp_path))
  weights = (hf_dir / 'model.safetensors').read_bytes()
  (hf_dir / 'model.safetensors').write_text('version https://git-lfs.github.com/spec/v1\n'
                                            'oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n'
                                            'size 12345\n')
  with pytest.raises(ConfigError, match=r'model.safetensors is a Git LFS pointer, not the weights it points to; run git '
                                        'lfs pull in'):
    convert.from_hf(str(hf_dir), str(tmp_path / 'w'), tokenizer='byte')
  (hf_dir / 'model.safetensors').write_bytes(b'\xff' * 8 + weights[8:])  # A header length of 2^64 - 1 bytes.
  with pytest.raises(ConfigError, match='is not a safetensors file, or is truncated or damaged'):
    convert.from_hf(str(hf_dir), str(tmp_path / 'w'), tokenizer='byte')
  (hf_dir / 'model.safetensors').write_bytes(weights)
  config_text = (hf_dir / 'config.json').read_text()
  (hf_dir / 'config.json').write_text(config_text[:len(config_text) // 2])
  with pytest.raises(ConfigError, match=r'config.json is not valid JSON \(.*\); download it again'):
    convert.from_hf(str(hf_dir), str(tmp_path / 'w'), tokenizer='byte')
  assert not (tmp_path / 'w').exists()
