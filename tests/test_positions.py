import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nopejax import positions

ROPE = positions.Encoding(position='rope', rope_theta=10000.0)


def test_inverse_frequencies_follow_the_formula():
  for head_dim, theta in ((16, 10000.0), (64, 500000.0)):
    m = np.arange(head_dim // 2)
    np.testing.assert_allclose(positions.rope_inverse_frequencies(head_dim, theta),
                               theta ** (-2.0 * m / head_dim), rtol=1e-6)


def test_rotation_is_llamas_rotate_half_as_complex_multiplication():
  """Dims (m, m + Dh/2) are the real and imaginary parts of z_m, turned by e^{i p theta_m}."""
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 5, 3, 8)), np.float64)
  p = np.array([[0, 1, 2, 7, 100], [3, 3, 9, 40, 1000]])
  inverse_frequencies = 1000.0 ** (-np.arange(4) * 2 / 8)
  z = (x[..., :4] + 1j * x[..., 4:]) * np.exp(1j * p[:, :, None, None] * inverse_frequencies)
  expected = np.concatenate([z.real, z.imag], axis=-1)
  rotated = positions.rotate(jnp.asarray(x, jnp.float32), jnp.asarray(p), jnp.asarray(inverse_frequencies, jnp.float32))
  np.testing.assert_allclose(rotated, expected, atol=2e-4)  # float32 angles at position 1000.
  np.testing.assert_allclose(rotated[:, :1][p[:, :1] == 0], x[:, :1][p[:, :1] == 0], atol=1e-6)  # Position 0: identity.


def test_rotation_gradient_is_the_rotation_by_the_opposite_angles():
  """rotate's own VJP against the Jacobian of the plain formula (autodiff), and in bfloat16 against
  autodiff of the float32 formula rounded once: bit for bit."""
  x = jax.random.normal(jax.random.key(0), (2, 6, 3, 8))
  g = jax.random.normal(jax.random.key(1), x.shape)
  p = jnp.array([[0, 1, 2, 7, 100, 5], [3, 3, 9, 40, 1000, 2]])
  inverse_frequencies = jnp.asarray(1000.0 ** (-np.arange(4) * 2 / 8), jnp.float32)

  def float32_formula(x):
    angles = p[:, :, None, None].astype(jnp.float32) * jnp.concatenate([inverse_frequencies] * 2)
    x = x.astype(jnp.float32)
    first, second = jnp.split(x, 2, axis=-1)
    return x * jnp.cos(angles) + jnp.concatenate([-second, first], -1) * jnp.sin(angles)

  jacobian = jax.jacrev(float32_formula)(x)  # Autodiff of the plain formula.
  expected = jnp.einsum('bthd,bthdBTHD->BTHD', g, jacobian)
  _, vjp = jax.vjp(lambda x: positions.rotate(x, p, inverse_frequencies), x)
  np.testing.assert_allclose(vjp(g)[0], expected, atol=1e-6)
  np.testing.assert_allclose(jnp.sum(vjp(g)[0] ** 2), jnp.sum(g ** 2), rtol=1e-5)  # A rotation keeps lengths.

  x_bf16, g_bf16 = x.astype(jnp.bfloat16), g.astype(jnp.bfloat16)
  _, vjp_bf16 = jax.vjp(lambda x: positions.rotate(x, p, inverse_frequencies), x_bf16)
  _, vjp_formula = jax.vjp(lambda x: float32_formula(x).astype(jnp.bfloat16), x_bf16)
  assert vjp_bf16(g_bf16)[0].dtype == jnp.bfloat16
  np.testing.assert_array_equal(vjp_bf16(g_bf16)[0].astype(jnp.float32), vjp_formula(g_bf16)[0].astype(jnp.float32))


def test_rope_logits_depend_only_on_the_position_difference():
  q = jax.random.normal(jax.random.key(1), (1, 1, 2, 16))
  k = jax.random.normal(jax.random.key(2), (1, 1, 2, 16))

  def logit(i, j):
    q_i = positions.apply(ROPE, q, k, jnp.array([[i]]), 1)[0]
    k_j = positions.apply(ROPE, q, k, jnp.array([[j]]), 1)[1]
    return jnp.sum(q_i * k_j, axis=-1)

  for i, j, shift in ((5, 2, 11), (9, 9, 300), (30, 0, 7)):
    np.testing.assert_allclose(logit(i, j), logit(i + shift, j + shift), atol=2e-5)
  assert not np.allclose(logit(5, 2), logit(5, 3), atol=1e-3)  # The difference itself matters.


def test_nope_leaves_q_and_k_alone():
  q, k = jnp.ones((1, 3, 2, 4)), jnp.full((1, 3, 1, 4), 2.0)
  q_out, k_out = positions.apply(positions.Encoding(), q, k, jnp.zeros((1, 3), jnp.int32), 3)
  assert q_out is q and k_out is k


def test_linear_and_ntk_follow_their_formulas():
  """PI: theta_m / s; NTK: theta_m of the base b s^(d/(d-2)); factor 0 takes s = length / L per forward."""
  d, b, s = 16, 10000.0, 4.0
  theta = b ** (-2.0 * np.arange(d // 2) / d)
  linear = positions.Encoding(position='rope', rope_scaling='linear', rope_scaling_factor=s, original_length=32)
  np.testing.assert_allclose(positions.inverse_frequencies(linear, d, 128), theta / s, rtol=1e-6)
  ntk = positions.Encoding(position='rope', rope_scaling='ntk', rope_scaling_factor=s, original_length=32)
  np.testing.assert_allclose(positions.inverse_frequencies(ntk, d, 128),
                             (b * s ** (d / (d - 2))) ** (-2.0 * np.arange(d // 2) / d), rtol=1e-5)
  per_length = positions.Encoding(position='rope', rope_scaling='linear', rope_scaling_factor=0, original_length=32)
  np.testing.assert_allclose(positions.inverse_frequencies(per_length, d, 256), theta / 8, rtol=1e-6)
  np.testing.assert_allclose(positions.inverse_frequencies(per_length, d, 16), theta, rtol=1e-6)  # s >= 1.


def test_yarn_inverse_frequencies_and_attention_factor_match_the_formula():
  d, b, s, L = 64, 10000.0, 8.0, 512
  yarn = positions.Encoding(position='rope', rope_scaling='yarn', rope_scaling_factor=s, original_length=L)
  got = np.asarray(positions.inverse_frequencies(yarn, d, 4096))
  # Written out per dim from docs/pe_methods.md: d_r = d ln(L / (2 pi r)) / (2 ln b), ramp over dim indices.
  d_r = lambda r: d * math.log(L / (2 * math.pi * r)) / (2 * math.log(b))
  low, high = math.floor(d_r(32)), math.ceil(d_r(1))
  assert 0 < low < high < d // 2  # This case exercises all three regimes.
  for m in range(d // 2):
    theta_m = b ** (-2 * m / d)
    ramp = min(max((m - low) / (high - low), 0.0), 1.0)
    assert math.isclose(got[m], theta_m / s * ramp + theta_m * (1 - ramp), rel_tol=1e-5)
  assert got[0] == np.float32(1.0) and math.isclose(got[-1], b ** (-2 * (d // 2 - 1) / d) / s, rel_tol=1e-5)
  # The logits grow by (0.1 ln s + 1)^2 through q; nothing at s = 1.
  scale = positions.query_scale(yarn, jnp.zeros((1, 3), jnp.int32), 4096)
  np.testing.assert_allclose(scale, (0.1 * math.log(8) + 1) ** 2, rtol=1e-6)
  per_length = dataclasses.replace(yarn, rope_scaling_factor=0)
  assert positions.query_scale(per_length, jnp.zeros((1, 3), jnp.int32), L) is None


def test_llama3_inverse_frequencies_match_the_formula():
  d, b, s, L = 128, 500000.0, 8.0, 8192
  llama3 = positions.Encoding(position='rope', rope_theta=b, rope_scaling='llama3', rope_scaling_factor=s,
                              original_length=L, llama3_low_freq_factor=1.0, llama3_high_freq_factor=4.0)
  got = np.asarray(positions.inverse_frequencies(llama3, d, 4 * L))
  regimes = set()
  for m in range(d // 2):
    theta_m = b ** (-2 * m / d)
    wavelength = 2 * math.pi / theta_m
    if wavelength < L / 4:
      expected, regime = theta_m, 'kept'
    elif wavelength > L / 1:
      expected, regime = theta_m / s, 'divided'
    else:
      smooth = (L / wavelength - 1) / (4 - 1)
      expected, regime = (1 - smooth) * theta_m / s + smooth * theta_m, 'blended'
    regimes.add(regime)
    assert math.isclose(got[m], expected, rel_tol=1e-5), m
  assert regimes == {'kept', 'divided', 'blended'}


def test_dynamic_ntk_is_plain_rope_within_the_training_length():
  d, L = 16, 64
  dynamic = positions.Encoding(position='rope', rope_scaling='dynamic', rope_scaling_factor=2.0, original_length=L)
  plain = positions.rope_inverse_frequencies(d, 10000.0)
  for length in (1, 17, L):
    np.testing.assert_array_equal(positions.inverse_frequencies(dynamic, d, length), plain)
  b = 10000.0 * (2.0 * 256 / L - 1) ** (d / (d - 2))
  np.testing.assert_allclose(positions.inverse_frequencies(dynamic, d, 256),
                             b ** (-2.0 * np.arange(d // 2) / d), rtol=1e-5)


def test_logn_is_exactly_one_within_the_training_length_then_ln_i_over_ln_L():
  L = 64
  p = jnp.arange(4 * L)[None]
  scale = np.asarray(positions.logn_scale(p, L))[0]
  np.testing.assert_array_equal(scale[:L], 1.0)
  np.testing.assert_allclose(scale[L:], np.log(np.arange(L, 4 * L) + 1) / np.log(L), rtol=1e-6)
  # Through apply, for a method without rotation: q scaled per position, k untouched.
  q, k = jnp.ones((1, 4 * L, 2, 4)), jnp.ones((1, 4 * L, 1, 4))
  q_out, k_out = positions.apply(positions.Encoding(logn=True, original_length=L), q, k, p, 4 * L)
  np.testing.assert_allclose(q_out[0, :, 0, 0], scale, rtol=1e-6)
  assert k_out is k


def test_alibi_slopes_for_8_and_12_heads():
  np.testing.assert_allclose(positions.alibi_slopes(8), [2.0 ** -h for h in range(1, 9)], rtol=1e-7)
  # 12 heads: the 8-head slopes, then every other slope of 16 heads (2^-0.5, 2^-1.5, ...) for the 4 others.
  np.testing.assert_allclose(positions.alibi_slopes(12),
                             [2.0 ** -h for h in range(1, 9)] + [2.0 ** -(h + 0.5) for h in range(4)], rtol=1e-7)


def test_alibi_bias_is_minus_slope_times_distance():
  slopes = positions.alibi_slopes(4)
  bias = np.asarray(positions.alibi_bias(slopes, jnp.array([[0, 3, 5]]), jnp.array([[0, 1, 2, 3]])))
  assert bias.shape == (1, 4, 3, 4)
  i, j = np.array([0, 3, 5])[:, None], np.arange(4)[None]
  for h in range(4):
    np.testing.assert_allclose(bias[0, h], -float(slopes[h]) * (i - j), rtol=1e-6)


def test_llama4_temperature_is_one_below_the_floor_scale_then_steps_up():
  p = jnp.arange(40)[None]
  scale = np.asarray(positions.llama4_scale(p, 8.0, 0.1))[0]
  np.testing.assert_array_equal(scale[:7], 1.0)  # (i + 1) / 8 < 1.
  np.testing.assert_allclose(scale, [1 + 0.1 * math.log(math.floor((i + 1) / 8) + 1) for i in range(40)], rtol=1e-6)
  both = positions.Encoding(logn=True, original_length=16, llama4_scaling=True, llama4_floor_scale=8.0)
  np.testing.assert_allclose(positions.query_scale(both, p, 40)[0],
                             scale * np.maximum(1, np.log(np.arange(40) + 1) / np.log(16)), rtol=1e-6)


def test_kerple_log_bias_is_minus_r1_log_of_one_plus_r2_distance():
  r1, r2 = np.array([0.5, 2.0]), np.array([1.0, 0.1])
  raw = tuple(jnp.asarray(np.log(np.expm1(r)), jnp.float32) for r in (r1, r2))  # softplus^-1
  bias = np.asarray(positions.kerple_bias(raw, jnp.array([[0, 4, 9]]), jnp.arange(10)[None]))
  i, j = np.array([0, 4, 9])[:, None], np.arange(10)[None]
  for h in range(2):
    visible = j <= i
    np.testing.assert_allclose(bias[0, h][visible], (-r1[h] * np.log1p(r2[h] * (i - j)))[visible], rtol=1e-5)
  init = jnp.full((2,), positions.KERPLE_INIT)
  np.testing.assert_allclose(jax.nn.softplus(init), 1.0, rtol=1e-6)  # r1 = r2 = 1 at initialization.


def test_rope_layers_name_each_layers_position():
  """'every:N' is SmolLM3's no_rope_layer_interval (transformers: int((i + 1) % N != 0)); a list is 0/1 per layer."""
  assert positions.layer_flags('', 4) is None
  assert positions.layer_flags('every:4', 8) == tuple(bool((i + 1) % 4 != 0) for i in range(8))
  assert positions.layer_flags(' 1, 0,1 ', 3) == (True, False, True)
  assert positions.flags_string(positions.layer_flags('every:2', 4)) == '1,0,1,0'
  for spec, message in (('every:0', 'positive interval'), ('every:x', 'positive interval'),
                        ('1,0', 'one 0 or 1 per layer of model.num_layers=3'), ('1,2,0', 'one 0 or 1 per layer')):
    with pytest.raises(ValueError, match=message):
      positions.layer_flags(spec, 3)
  from nopejax import config
  cfg = config.get_config()
  cfg.model.rope_layers = '1,1,1,0'
  with pytest.raises(config.ConfigError, match="picks the RoPE layers of a RoPE model but model.position='nope'"):
    config.validate(cfg)
  cfg.model.position, cfg.model.rope_layers = 'rope', '1,1'
  with pytest.raises(config.ConfigError, match='not one 0 or 1 per layer of model.num_layers=4'):
    config.validate(cfg)


def test_a_traced_layer_flag_selects_exactly_what_the_static_one_computes():
  """Scanned layers carry their flag as data: both results are formed and one selected, bit for bit.
  On a NoPE layer of a RoPE model neither the rotation nor YaRN's factor applies; log-n does."""
  yarn = positions.Encoding(position='rope', rope_scaling='yarn', rope_scaling_factor=4.0, original_length=8, logn=True)
  q = jax.random.normal(jax.random.key(3), (2, 24, 2, 8))
  k = jax.random.normal(jax.random.key(4), (2, 24, 1, 8))
  p = jnp.tile(jnp.arange(24), (2, 1))
  traced = jax.jit(lambda q, k, p, flag: positions.apply(yarn, q, k, p, 24, flag))
  for flag in (True, False):
    static = jax.jit(lambda q, k, p: positions.apply(yarn, q, k, p, 24, flag))(q, k, p)
    for a, b in zip(traced(q, k, p, jnp.asarray(flag)), static):
      np.testing.assert_array_equal(a, b)
  q_nope, k_nope = positions.apply(yarn, q, k, p, 24, False)
  assert k_nope is k
  np.testing.assert_allclose(q_nope, q * positions.logn_scale(p, 8)[:, :, None, None], rtol=1e-6)
  # None: as model.position (rope here).
  np.testing.assert_array_equal(positions.apply(yarn, q, k, p, 24, None)[0], positions.apply(yarn, q, k, p, 24, True)[0])
