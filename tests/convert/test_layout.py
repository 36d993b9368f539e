"""The mapping between the two layouts: every tensor kind converts both ways, and a Llama
config.json becomes the nopejax config and back."""
import json

import numpy as np
import pytest

from hf_fixtures import FIXTURES
from nopejax import config
from nopejax.convert import layout


@pytest.mark.parametrize('kind, shape', [('same', (5,)), ('transpose', (3, 4)), ('heads_in', (6, 4, 2)),
                                         ('heads_out', (4, 2, 6))])
def test_to_hf_inverts_to_nopejax(kind, shape):
  ours = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
  theirs = layout.to_hf(kind, ours)
  assert theirs.shape == layout.hf_shape(kind, shape)
  np.testing.assert_array_equal(layout.to_nopejax(kind, theirs, shape), ours)


def test_every_parameter_has_one_hf_name():
  cfg = layout.config_from_hf(json.loads((FIXTURES / 'hf_llama' / 'config.json').read_text()), False, 'x')
  names = [name for name, _ in layout.hf_layout(cfg).values()]
  assert len(names) == len(set(names)) == 3 + 10 * cfg.model.num_layers
  cfg.model.tie_embeddings = True
  assert 'lm_head.weight' not in {name for name, _ in layout.hf_layout(cfg).values()}


def test_hf_config_round_trips_through_the_nopejax_config():
  source = json.loads((FIXTURES / 'hf_llama' / 'config.json').read_text())
  cfg = layout.config_from_hf(source, False, 'x')
  assert cfg.model.position == 'rope' and cfg.model.rope_theta == 1000.0 and config.head_dim(cfg) == 16
  written = layout.hf_config_of(cfg, {'config': source}, 'bfloat16')
  again = layout.config_from_hf(written, False, 'x')
  assert again.model.to_dict() == cfg.model.to_dict() and again.data.seq_len == cfg.data.seq_len
  assert not layout.hf_config_of(cfg).get('nope')
  cfg.model.position = 'nope'
  assert layout.hf_config_of(cfg)['nope'] is True
