"""nopejax.config: the declared defaults, validation, loading and saving; the shipped config files."""
import ast
import json
import pathlib
import re

import pytest

import nopejax
from nopejax import config, config_checks
from nopejax.config import ConfigError


def checked(**changes):
  cfg = config.get_config()
  for dotted, value in changes.items():
    *sections, key = dotted.split('__')
    node = cfg
    for section in sections:
      node = node[section]
    node[key] = value
  config.validate(cfg)


def test_defaults_are_valid_and_locked():
  cfg = config.get_config()
  config.validate(cfg)
  with pytest.raises(AttributeError):
    cfg.train.stepz = 3


@pytest.mark.parametrize('changes, message', [
    ({'model__num_heads': 3}, 'model.num_heads=3 does not divide model.embed_dim=128'),
    ({'model__num_kv_heads': 3}, 'model.num_kv_heads=3 does not divide model.num_heads=4'),
    ({'model__position': 't5'}, "model.position='t5' is not one of"),
    ({'model__rope_scaling': 'ntk'}, "model.rope_scaling='ntk' scales RoPE but model.position='nope'"),
    ({'model__position': 'rope', 'model__rope_scaling': 'pi'}, "model.rope_scaling='pi' is not one of"),
    ({'model__rope_scaling_factor': 0.5}, 'model.rope_scaling_factor=0.5 must be at least 1'),
    ({'model__yarn_beta_fast': 0.5}, 'model.yarn_beta_slow < model.yarn_beta_fast'),
    ({'model__position': 'alibi', 'model__attention_impl': 'splash'},
     "model.attention_impl='splash' takes no bias on the logits, which model.position=alibi adds"),
    ({'model__llama4_scaling': True, 'model__llama4_floor_scale': 0.0}, 'model.llama4_floor_scale=0.0 must be a finite number > 0'),
    ({'model__position': 'rope', 'model__head_dim': 15}, 'model.position=rope needs an even head dimension'),
    ({'model__dtype': 'float16'}, "model.dtype='float16' is not one of"),
    ({'model__temperature': 0.0}, 'model.temperature=0.0 must be a finite number > 0 (it multiplies every query)'),
    ({'train__trainable': 'all'}, "train.trainable='all' is not one of"),
    ({'train__log_every': 0}, 'train.log_every=0 must be >= 1; set it to e.g. 50 (the default).'),
    ({'train__checkpoint_every': 0}, 'train.checkpoint_every=0 must be >= 1'),
    ({'train__keep_checkpoints': -1}, 'train.keep_checkpoints=-1 must be >= 1'),
    ({'train__eval_batches': 0}, 'train.eval_batches=0 must be >= 1'),
    ({'train__skip_nonfinite': -2}, 'train.skip_nonfinite=-2 must be >= 0 (0 stops at the first non-finite update'),
    ({'model__attention_impl': 'cudnn'}, "model.attention_impl='cudnn' needs model.dtype='bfloat16', not 'float32'"),
    ({'train__trainable': 'temperature', 'search__init': '0.8'},
     'search.init=0.8 is below search.min_temperature=1.0, so the first update would clamp it'),
    ({'search__init': 'warm'}, "search.init='warm' is neither a finite number nor 'auto'"),
    ({'search__init': 'nan'}, "search.init='nan' is neither a finite number nor 'auto'"),
    ({'search__min_slope': 'none'}, "search.min_slope='none' is neither a finite number nor ''"),
    ({'search__min_slope': '-inf'}, "search.min_slope='-inf' is neither a finite number nor ''"),
    ({'train__trainable': 'temperature', 'search__init': 'auto', 'search__init_candidates': (0.8, 1.6)},
     'search.init_candidates=(0.8, 1.6) must be a non-empty list of temperatures of at least search.min_temperature=1.0'),
    ({'train__trainable': 'temperature', 'search__init': 'auto', 'search__init_candidates': ()},
     'search.init_candidates=() must be a non-empty list'),
    ({'search__base': 'runs/x'}, "search.base is set but train.trainable is 'model'"),
    ({'model__remat': 'dots'}, "model.remat='dots' is not one of"),
    ({'train__microbatches': 5}, 'train.microbatches=5 does not divide train.batch_size=32'),
    ({'train__loss_chunk': 48}, 'train.loss_chunk=48 does not divide data.seq_len=64'),
    ({'model__temperature_schedule': 'cosine'}, "model.temperature_schedule='cosine' is not one of"),
    ({'train__trainable': 'temperature', 'model__temperature_schedule': 'log'},
     "model.temperature_schedule='log' in a search needs model.temperature_length"),
    ({'search__lengths': (64, 128)}, 'search.lengths=(64, 128) must be positive lengths up to data.seq_len=64'),
    ({'model__temperature_octaves': 3}, "model.temperature_octaves=3 must be a positive integer, above 1 only with"),
    ({'model__temperature_octaves': 0, 'model__temperature_schedule': 'log'}, 'model.temperature_octaves=0 must be >= 1'),
    ({'model__temperature_octave_shape': 'spline'}, "model.temperature_octave_shape='spline' is not one of"),
    ({'search__share_slopes': True}, 'search.share_slopes=True must be True or False, and True only with'),
])
def test_bad_values_name_the_key(changes, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    checked(**changes)


# One value out of its range per rule of config_checks.RANGES, and a NaN where a float is.
@pytest.mark.parametrize('changes, message', [
    ({'model__embed_dim': 0}, 'model.embed_dim=0 must be > 0; set it to e.g. 128 (the default).'),
    ({'model__num_layers': 0}, 'model.num_layers=0 must be > 0; set it to e.g. 4 (the default).'),
    ({'model__mlp_dim': -4}, 'model.mlp_dim=-4 must be > 0'),
    ({'model__num_heads': 0}, 'model.num_heads=0 must be > 0'),
    ({'model__num_kv_heads': -1}, 'model.num_kv_heads=-1 must be > 0'),
    ({'model__vocab_size': 0}, 'model.vocab_size=0 must be > 0'),
    ({'model__head_dim': -8}, 'model.head_dim=-8 must be >= 0 (0 = embed_dim // num_heads); set it to e.g. 0'),
    ({'model__norm_eps': float('nan')}, 'model.norm_eps=nan must be a finite number > 0'),
    ({'model__attention_block': -1}, "model.attention_block=-1 must be >= 0 (0 = the kernel's own choice)"),
    ({'model__original_length': -2}, 'model.original_length=-2 must be >= 0 (0 = data.seq_len)'),
    ({'data__seq_len': 0}, 'data.seq_len=0 must be > 0'),
    ({'data__worker_count': -1}, 'data.worker_count=-1 must be >= 0 (0 reads in the main process)'),
    ({'data__open_shards': 0}, 'data.open_shards=0 must be >= 1'),
    ({'data__shuffle_seed': -1}, 'data.shuffle_seed=-1 must be >= 0'),
    ({'train__steps': 0}, 'train.steps=0 must be > 0'),
    ({'train__batch_size': -8}, 'train.batch_size=-8 must be > 0'),
    ({'train__microbatches': 0}, 'train.microbatches=0 must be >= 1 (1 = no accumulation)'),
    ({'train__learning_rate': -1.0}, 'train.learning_rate=-1.0 must be a finite number >= 0; set it to e.g. 0.002'),
    ({'train__learning_rate': float('nan')}, 'train.learning_rate=nan must be a finite number >= 0'),
    ({'train__learning_rate': float('inf')}, 'train.learning_rate=inf must be a finite number >= 0'),
    ({'train__final_lr_fraction': -3.0}, 'train.final_lr_fraction=-3.0 must be a finite number in [0, 1]'),
    ({'train__final_lr_fraction': 1.5}, 'train.final_lr_fraction=1.5 must be a finite number in [0, 1]'),
    ({'train__b1': -0.1}, 'train.b1=-0.1 must be a finite number in [0, 1)'),
    ({'train__b2': 1.5}, 'train.b2=1.5 must be a finite number in [0, 1); set it to e.g. 0.95 (the default).'),
    ({'train__b2': 1.0}, 'train.b2=1.0 must be a finite number in [0, 1)'),
    ({'train__eps': 0.0}, 'train.eps=0.0 must be a finite number > 0'),
    ({'train__weight_decay': -0.1}, 'train.weight_decay=-0.1 must be a finite number >= 0'),
    ({'train__clip_norm': -1.0}, 'train.clip_norm=-1.0 must be a finite number > 0 (0 would zero every update'),
    ({'train__clip_norm': 0.0}, 'train.clip_norm=0.0 must be a finite number > 0'),
    ({'train__stop_after': -1}, 'train.stop_after=-1 must be >= 0 (0 = run to train.steps)'),
    ({'train__warmup_steps': -1}, 'train.warmup_steps=-1 must be >= 0'),
    ({'train__loss_chunk': -64}, 'train.loss_chunk=-64 must be >= 0'),
    ({'train__eval_every': -1}, 'train.eval_every=-1 must be >= 0 (0 = no evaluation during training)'),
    ({'train__seed': -3}, 'train.seed=-3 must be >= 0'),
    ({'train__peak_flops_per_device': -1.0}, 'train.peak_flops_per_device=-1.0 must be a finite number >= 0'),
    ({'train__temperature__learning_rate': float('nan')}, 'train.temperature.learning_rate=nan must be a finite'),
    ({'train__temperature__weight_decay': -1.0}, 'train.temperature.weight_decay=-1.0 must be a finite number >= 0'),
    ({'train__temperature__clip_norm': 0.0}, 'train.temperature.clip_norm=0.0 must be a finite number > 0'),
    ({'mesh__fsdp': 0}, 'mesh.fsdp=0 must be >= 1, or -1 for the devices the other axes leave'),
    ({'mesh__tensor': -2}, 'mesh.tensor=-2 must be >= 1, or -1'),
    ({'search__min_temperature': -1.0}, 'search.min_temperature=-1.0 must be a finite number >= 0'),
    ({'search__init_candidates': (1.0, float('nan'))}, 'search.init_candidates=(1.0, nan) must hold only numbers > 0'),
    ({'search__lengths': (0, 64)}, 'search.lengths=(0, 64) must hold only numbers > 0'),
    ({'eval__lengths': (16, '(16,x)')}, "eval.lengths=(16, '(16,x)') must hold only numbers > 0"),
    ({'eval__stride': -1}, 'eval.stride=-1 must be >= 0'),
    ({'eval__max_tokens': 0}, 'eval.max_tokens=0 must be > 0'),
    ({'eval__batch_size': 0}, 'eval.batch_size=0 must be > 0'),
    ({'eval__query_chunk': -1}, 'eval.query_chunk=-1 must be > 0'),
    ({'eval__passkey_depths': -1}, 'eval.passkey_depths=-1 must be >= 0 (0 skips the passkey)'),
    ({'eval__seed': -1}, 'eval.seed=-1 must be >= 0'),
])
def test_values_out_of_range_name_key_value_rule_and_fix(changes, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    checked(**changes)


def _numeric_keys(node, prefix=''):
  for key, value in node.items():
    if hasattr(value, 'items'):
      yield from _numeric_keys(value, f'{prefix}{key}.')
    elif (isinstance(value, (int, float)) and not isinstance(value, bool)) or (
        isinstance(value, tuple) and key in ('lengths', 'init_candidates')):
      yield f'{prefix}{key}'


def test_every_numeric_key_has_a_range_rule():
  """A numeric key added to nopejax/defaults.py needs its rule in config_checks.RANGES."""
  numeric = set(_numeric_keys(config.get_config()))
  assert len(numeric) > 60 and sorted(numeric - set(config_checks.RANGES)) == []
  assert sorted(set(config_checks.RANGES) - numeric) == []


def test_range_boundaries_that_are_allowed():
  checked(train__learning_rate=0.0, train__final_lr_fraction=1.0, train__b1=0.0, train__weight_decay=0.0,
          data__worker_count=0, model__head_dim=0, mesh__fsdp=-1, mesh__data=1)


def test_head_dim_given_explicitly_frees_the_width_constraint():
  checked(model__num_heads=3, model__head_dim=32, model__num_kv_heads=1)


def test_search_init_parses_numbers_and_auto():
  cfg = config.get_config()
  cfg.search.init = '1.6'
  assert config.search_init(cfg) == 1.6
  cfg.search.init = 'auto'
  assert config.search_init(cfg) == 'auto'


def test_saved_config_round_trips_with_tuples_and_rejects_unknown_keys():
  cfg = config.get_config()
  cfg.train.steps = 77
  restored = config.from_dict(json.loads(config.to_json(cfg)))
  assert restored == cfg and isinstance(restored.mesh.rules[0][1], tuple)
  with pytest.raises(ConfigError, match='Unknown config key train.stepz'):
    config.from_dict({'train': {'stepz': 1}})
  # model.remat was a bool before its policies: such a config.json still loads.
  assert config.from_dict({'model': {'remat': True}}).model.remat == 'full'


def test_is_declared():
  assert config.is_declared('train.steps') and not config.is_declared('train.stepz')


ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG_FILES = sorted((ROOT / 'configs').glob('*.py'))


@pytest.mark.parametrize('path', CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_every_shipped_config_is_valid(path, tmp_path):
  """Each file by its path, as --config loads it; workdir*.py read a workdir's config.json (after a colon)."""
  (tmp_path / 'config.json').write_text(config.to_json(config.from_file(ROOT / 'configs' / 'tiny.py')))
  cfg = config.from_file(f'{path}:{tmp_path}' if path.stem.startswith('workdir') else path)
  config.validate(cfg)


def _imported_modules(path):
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      yield node.module


def test_nothing_imports_the_configs_folder():
  """The package owns its defaults: configs/ builds on nopejax, never the reverse, and its files load
  each other by path, so that --config works from any directory."""
  sources = sorted(pathlib.Path(nopejax.__file__).parent.rglob('*.py')) + CONFIG_FILES
  importers = [str(path) for path in sources
               if any(name == 'configs' or name.startswith('configs.') for name in _imported_modules(path))]
  assert len(sources) > 20 and importers == []
