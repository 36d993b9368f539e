"""Tests of nopejax/attention/core.py: query temperatures, the choice of kernel, and `attend`."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nopejax import config
from nopejax import attention
from nopejax.attention import core
from nopejax.config import ConfigError
from tests.attention.reference import reference_attention


def test_attend_matches_reference_with_gqa_and_segments():
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (2, 8, 4, 16))
  k = jax.random.normal(kk, (2, 8, 2, 16))
  v = jax.random.normal(kv, (2, 8, 2, 16))
  segment_ids = jnp.array([[1, 1, 1, 2, 2, 2, 2, 3], [1] * 8])
  np.testing.assert_allclose(attention.attend(q, k, v, segment_ids),
                             reference_attention(q, k, v, segment_ids), atol=1e-5)


def test_scale_queries_multiplies_each_head_by_its_temperature():
  q = jnp.ones((1, 2, 3, 4), jnp.bfloat16)
  scaled = attention.scale_queries(q, jnp.array([1.0, 1.5, 2.0]))
  assert scaled.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(scaled[0, 0, :, 0], np.float32), [1.0, 1.5, 2.0])


def test_temperature_on_q_equals_sharper_logits():
  """softmax(c q.k / sqrt(d)): scaling q by c is the same as scaling the logits by c."""
  kq, kk, kv = jax.random.split(jax.random.key(1), 3)
  q, k, v = (jax.random.normal(key, (1, 6, 2, 8)) for key in (kq, kk, kv))
  ones = jnp.ones((1, 6), jnp.int32)
  c = jnp.array([1.7, 1.7])
  np.testing.assert_allclose(attention.attend(attention.scale_queries(q, c), k, v, ones),
                             reference_attention(1.7 * q, k, v, ones), atol=1e-5)


def test_auto_picks_the_kernel_by_platform_shape_and_dtype():
  choose = functools.partial(attention.choose, 'auto', seq_len=4096, head_dim=64, chunked_from=2048)
  assert choose(platform='tpu', dtype=jnp.float32, has_segments=True)[0] == 'splash'
  assert choose(platform='gpu', dtype=jnp.bfloat16, has_segments=False)[0] == 'cudnn'
  kernel, reason = choose(platform='gpu', dtype=jnp.float32, has_segments=False)
  assert kernel == 'chunked' and 'bfloat16' in reason
  kernel, reason = choose(platform='gpu', dtype=jnp.bfloat16, has_segments=True)
  assert kernel == 'chunked' and 'packed documents' in reason
  assert choose(platform='cpu', dtype=jnp.float32, has_segments=True)[0] == 'chunked'
  kernel, reason = attention.choose('auto', 'cpu', 256, jnp.float32, 64, True, 2048)
  assert kernel == 'xla' and '256 tokens < model.attention_chunked_from=2048' in reason
  assert attention.choose('chunked', 'tpu', 8, jnp.float32, 64, True, 2048)[0] == 'chunked'  # Explicit wins.
  kernel, reason = choose(platform='tpu', dtype=jnp.float32, has_segments=True, has_bias=True)
  assert kernel == 'chunked' and 'no bias' in reason  # ALiBi: splash takes no bias.


def test_the_default_block_is_64_for_chunked_on_cpu_and_512_elsewhere(monkeypatch):
  assert attention.default_block('chunked', 'cpu') == 64
  assert attention.default_block('chunked', 'gpu') == attention.default_block('splash', 'tpu') == 512
  cfg = config.get_config()
  cfg.data.seq_len = 256  # The defaults: chunked from 256 tokens on CPU.
  assert attention.kernel_for_run(cfg, 'cpu')[0] == 'chunked'
  blocks = []
  monkeypatch.setattr(core, 'flash_attention', lambda *args: blocks.append(args[4]) or args[0])
  q = jnp.zeros((1, 256, 2, 8))
  attention.attend(q, q, q, implementation='auto')  # block_size 0: the kernel's own.
  attention.attend(q, q, q, implementation='chunked', block_size=32)
  assert blocks == [64, 32]


def test_cudnn_is_refused_off_gpu_with_a_sentence():
  cfg = config.get_config()
  cfg.model.attention_impl = 'cudnn'
  cfg.model.dtype = 'bfloat16'
  cfg.data.separate_documents = False
  with pytest.raises(ConfigError, match="needs a GPU but this run's devices are cpu"):
    attention.kernel_for_run(cfg, 'cpu')
  assert attention.kernel_for_run(cfg, 'gpu')[0] == 'cudnn'
  cfg.model.attention_impl = 'splash'
  assert 'interpreted on cpu' in attention.kernel_for_run(cfg, 'cpu')[1]


def test_query_temperatures_follow_each_schedules_formula():
  positions_1xT = jnp.arange(40)[None]  # 1-based i = 1 .. 40
  i = np.arange(1, 41, dtype=np.float64)[:, None]
  c, a = jnp.array([1.5, 0.8]), jnp.array([0.3, -0.1])
  np.testing.assert_array_equal(attention.query_temperatures('constant', positions_1xT, 16, c)[0, 0], c)
  log = attention.query_temperatures('log', positions_1xT, 16, c, a)[0]
  expected = np.where(i <= 16, 1.0, np.asarray(c) + np.asarray(a) * np.log(i / 16))
  np.testing.assert_allclose(log, expected, rtol=1e-6)
  assert np.all(np.asarray(log[:16]) == 1.0)  # Exactly 1 within L: the base model there.
  ssmax = attention.query_temperatures('ssmax', positions_1xT, 16, c)[0]
  np.testing.assert_allclose(ssmax, np.asarray(c) * np.log(i), rtol=1e-6, atol=1e-7)


def test_log_schedule_with_octaves_is_a_ramp_linear_in_ln_i_within_each_octave():
  positions_1xT = jnp.arange(160)[None]  # i = 1 .. 160 with L = 16: octaves 16-32, 32-64, 64-160.
  i = np.arange(1, 161, dtype=np.float64)[:, None]
  c, a_KxH = jnp.array([1.5, 0.8]), jnp.array([[0.3, -0.1], [0.5, 0.2], [-0.4, 0.7]])
  ramp = attention.query_temperatures('log', positions_1xT, 16, c, a_KxH)[0]
  u, ln2 = np.log(i / 16), np.log(2.0)
  expected = (np.asarray(c) + np.clip(u, 0, ln2) * np.asarray(a_KxH[0]) + np.clip(u - ln2, 0, ln2) * np.asarray(a_KxH[1])
              + np.maximum(u - 2 * ln2, 0) * np.asarray(a_KxH[2]))
  np.testing.assert_allclose(ramp, np.where(i <= 16, 1.0, expected), rtol=1e-5)
  assert np.all(np.asarray(ramp[:16]) == 1.0)
  # One octave ([1, H]) is the log form itself, unclipped all the way out.
  np.testing.assert_allclose(attention.query_temperatures('log', positions_1xT, 16, c, a_KxH[:1]),
                             attention.query_temperatures('log', positions_1xT, 16, c, a_KxH[0]), rtol=1e-6)


def test_log_schedule_with_step_octaves_holds_one_value_per_octave():
  positions_1xT = jnp.arange(160)[None]  # i = 1 .. 160 with L = 16: octaves 17-32, 33-64, 65 onwards.
  c, a_KxH = jnp.array([1.5, 0.8]), jnp.array([[0.3, -0.1], [0.5, 0.2], [-0.4, 0.7]])
  step = np.asarray(attention.query_temperatures('log', positions_1xT, 16, c, a_KxH, 'step')[0])
  octave_T = np.digitize(np.arange(1, 161), [16, 32, 64], right=True) - 1  # -1 within L; i = 32 is octave 0.
  expected = np.where(octave_T[:, None] < 0, 1.0, np.asarray(c) + np.asarray(a_KxH)[octave_T.clip(0)])
  np.testing.assert_allclose(step, expected, rtol=1e-6)
  assert np.all(step[:16] == 1.0) and np.all(step[159] == step[64])  # The last octave goes on unchanged.
