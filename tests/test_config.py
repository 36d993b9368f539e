"""nopejax.config: the declared defaults, validation, loading and saving; the shipped config files."""
import ast
import json
import pathlib
import re

import pytest

import nopejax
from nopejax import config
from nopejax.config import ConfigError


def checked(**changes):
  cfg = config.get_config()
  for dotted, value in changes.items():
    section, key = dotted.split('__')
    cfg[section][key] = value
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
    ({'model__llama4_scaling': True, 'model__llama4_floor_scale': 0.0}, 'model.llama4_floor_scale=0.0 must be positive'),
    ({'model__position': 'rope', 'model__head_dim': 15}, 'model.position=rope needs an even head dimension'),
    ({'model__dtype': 'float16'}, "model.dtype='float16' is not one of"),
    ({'model__temperature': 0.0}, 'model.temperature=0.0 must be positive'),
    ({'train__trainable': 'all'}, "train.trainable='all' is not one of"),
    ({'train__warmup_steps': 5000}, 'train.warmup_steps=5000 must be at least 0 and below train.steps=2000'),
    ({'train__warmup_steps': 2000}, 'train.warmup_steps=2000 must be at least 0 and below train.steps=2000'),
    ({'train__log_every': 0}, 'train.log_every=0 must be at least 1; set it to a positive number of steps.'),
    ({'train__checkpoint_every': 0}, 'train.checkpoint_every=0 must be at least 1'),
    ({'train__keep_checkpoints': -1}, 'train.keep_checkpoints=-1 must be at least 1'),
    ({'train__eval_batches': 0}, 'train.eval_every=500 with train.eval_batches=0 evaluates nothing; set train.eval_batches'),
    ({'train__skip_nonfinite': -2}, 'train.skip_nonfinite=-2 must not be negative'),
    ({'model__attention_impl': 'cudnn'}, "model.attention_impl='cudnn' needs model.dtype='bfloat16', not 'float32'"),
    ({'train__trainable': 'temperature', 'search__init': '0.8'},
     'search.init=0.8 is below search.min_temperature=1.0, so the first update would clamp it'),
    ({'search__init': 'warm'}, "search.init='warm' is neither a number nor 'auto'"),
    ({'search__min_slope': 'none'}, "search.min_slope='none' is neither a number nor ''"),
    ({'search__base': 'runs/x'}, "search.base is set but train.trainable is 'model'"),
    ({'model__remat': 'dots'}, "model.remat='dots' is not one of"),
    ({'train__microbatches': 5}, 'train.microbatches=5 does not divide train.batch_size=32'),
    ({'train__loss_chunk': 48}, 'train.loss_chunk=48 does not divide data.seq_len=64'),
    ({'model__temperature_schedule': 'cosine'}, "model.temperature_schedule='cosine' is not one of"),
    ({'train__trainable': 'temperature', 'model__temperature_schedule': 'log'},
     "model.temperature_schedule='log' in a search needs model.temperature_length"),
    ({'search__lengths': (64, 128)}, 'search.lengths=(64, 128) must be positive lengths up to data.seq_len=64'),
    ({'model__temperature_octaves': 3}, "model.temperature_octaves=3 must be a positive integer, above 1 only with"),
    ({'model__temperature_octaves': 0, 'model__temperature_schedule': 'log'}, 'model.temperature_octaves=0 must be'),
    ({'model__temperature_octave_shape': 'spline'}, "model.temperature_octave_shape='spline' is not one of"),
    ({'search__share_slopes': True}, 'search.share_slopes=True must be True or False, and True only with'),
])
def test_bad_values_name_the_key(changes, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    checked(**changes)


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
