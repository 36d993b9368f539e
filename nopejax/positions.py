"""Position encodings as small pure functions of q, k and token positions (docs/pe_methods.md).

Each method acts on attention through one of three hooks, so one attention core serves them all:
  rotation of q and k   RoPE and its scalings (`model.rope_scaling`: linear, ntk, dynamic, yarn, llama3);
  bias on the logits    ALiBi and KERPLE-log (learned), added after the 1/sqrt(d) scale (`bias`,
                        evaluated per block of queries and keys by every kernel, never as one [H, T, T]
                        tensor on the long path);
  multiplier on q       YaRN's attention factor, log-n scaling (`model.logn`) and Llama 4's
                        temperature (`model.llama4_scaling`), with any method.
NoPE uses none: the causal mask is the only source of position.

Position is per layer: `model.rope_layers` (layer_flags) makes a hybrid of a RoPE model, RoPE on the
flagged layers and NoPE on the rest (SmolLM3's pattern is RoPE on all but every 4th layer). On a
NoPE layer neither the rotation nor YaRN's attention factor applies; log-n and Llama 4's temperature
act on every layer.

RoPE rotates each pair of head dimensions (m, m + Dh/2) of q and k by the angle
position * inverse_frequency[m], Llama's "rotate_half" layout, so q_i . k_j depends on i - j only.
Notation as in docs/pe_methods.md: L the original (training) length, s the scaling factor, d the head dim.
A multiplier on q scales only the content term q.k, never an additive bias.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

POSITIONS = ('nope', 'rope', 'alibi', 'kerple')
ROPE_SCALINGS = ('none', 'linear', 'ntk', 'dynamic', 'yarn', 'llama3')


@dataclasses.dataclass(frozen=True)
class Encoding:
  """The position settings of `cfg.model`, hashable so a jitted model can hold them as static data."""
  position: str = 'nope'
  rope_theta: float = 10000.0
  rope_scaling: str = 'none'
  rope_scaling_factor: float = 1.0  # 0: each forward's own T / L (zero-shot at every evaluated length).
  original_length: int = 0  # L; 0 only where nothing reads it.
  yarn_beta_fast: float = 32.0
  yarn_beta_slow: float = 1.0
  llama3_low_freq_factor: float = 1.0
  llama3_high_freq_factor: float = 4.0
  logn: bool = False
  llama4_scaling: bool = False
  llama4_floor_scale: float = 8192.0
  llama4_attn_scale: float = 0.1


def layer_flags(spec: str, num_layers: int):
  """`model.rope_layers` as one bool per layer (True: the layer uses RoPE), or None for '' (every
  layer follows model.position). 'every:N': RoPE on all but every N-th layer (layers N-1, 2N-1, ...
  are NoPE, as SmolLM3's no_rope_layer_interval); '1,1,1,0': one 0/1 per layer. ValueError names a bad spec."""
  spec = str(spec).strip()
  if not spec:
    return None
  if spec.startswith('every:'):
    try:
      interval = int(spec[len('every:'):])
    except ValueError:
      interval = 0
    if interval < 1:
      raise ValueError(f"model.rope_layers={spec!r} needs a positive interval after 'every:'; set e.g. every:4.")
    return tuple((i + 1) % interval != 0 for i in range(num_layers))
  values = [v.strip() for v in spec.split(',')]
  if any(v not in ('0', '1') for v in values) or len(values) != num_layers:
    raise ValueError(f'model.rope_layers={spec!r} is not one 0 or 1 per layer of model.num_layers={num_layers}; '
                     "set a comma list like 1,1,1,0 (1 = RoPE), 'every:4' or '' (every layer as model.position).")
  return tuple(v == '1' for v in values)


def flags_string(flags) -> str:
  """The canonical '1,1,1,0' of per-layer flags ('' for None): how checkpoints and exports record them."""
  return '' if flags is None else ','.join('1' if f else '0' for f in flags)


def from_config(cfg) -> Encoding:
  m = cfg.model
  return Encoding(
      position=m.position, rope_theta=float(m.rope_theta), rope_scaling=m.rope_scaling,
      rope_scaling_factor=float(m.rope_scaling_factor), original_length=int(m.original_length or cfg.data.seq_len),
      yarn_beta_fast=float(m.yarn_beta_fast), yarn_beta_slow=float(m.yarn_beta_slow),
      llama3_low_freq_factor=float(m.llama3_low_freq_factor),
      llama3_high_freq_factor=float(m.llama3_high_freq_factor), logn=bool(m.logn),
      llama4_scaling=bool(m.llama4_scaling), llama4_floor_scale=float(m.llama4_floor_scale),
      llama4_attn_scale=float(m.llama4_attn_scale))


# ---------------------------------------------------------------------------------------------
# Rotation: RoPE and its scalings.


def rope_inverse_frequencies(head_dim: int, theta: float):
  """theta^(-2m / head_dim) for m = 0 .. head_dim/2 - 1, float32 [head_dim // 2] (as Llama computes them)."""
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  return 1.0 / (jnp.float32(theta) ** exponents)


def ntk_theta(theta: float, factor: float, head_dim: int) -> float:
  """NTK-aware base: b * s^(d / (d - 2)), so the lowest frequency is interpolated by s and the highest kept."""
  return theta * factor ** (head_dim / (head_dim - 2))


def dynamic_ntk_theta(theta: float, factor: float, head_dim: int, length: int, original_length: int) -> float:
  """Dynamic NTK at current length l: b * (s l / L - (s - 1))^(d / (d - 2)) past L, exactly b within it."""
  if length <= original_length:
    return theta
  return theta * (factor * length / original_length - (factor - 1)) ** (head_dim / (head_dim - 2))


def yarn_inverse_frequencies(head_dim: int, theta: float, factor: float, original_length: int,
                             beta_fast: float, beta_slow: float):
  """YaRN's "NTK-by-parts": dims that turn more than beta_fast times over L keep their frequency,
  dims that turn fewer than beta_slow times are interpolated by s, a linear ramp over dim indices between."""

  def correction_dim(rotations):  # The dim index whose wavelength fits `rotations` times in L.
    return head_dim * math.log(original_length / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low = max(math.floor(correction_dim(beta_fast)), 0)
  high = min(math.ceil(correction_dim(beta_slow)), head_dim - 1)
  high = high + 0.001 if high == low else high  # No division by zero when the ramp is one index wide.
  ramp_F = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0.0, 1.0)
  inverse_F = rope_inverse_frequencies(head_dim, theta)
  return inverse_F / factor * ramp_F + inverse_F * (1.0 - ramp_F)


def yarn_attention_factor(factor: float) -> float:
  """YaRN multiplies cos and sin by 0.1 ln s + 1, so the logits by its square."""
  return 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0


def llama3_inverse_frequencies(head_dim: int, theta: float, factor: float, original_length: int,
                               low_freq_factor: float, high_freq_factor: float):
  """Llama 3.1: wavelengths under L / high_freq_factor kept, over L / low_freq_factor divided by s,
  a blend linear in L / wavelength between."""
  inverse_F = rope_inverse_frequencies(head_dim, theta)
  wavelength_F = 2 * math.pi / inverse_F
  smooth_F = (original_length / wavelength_F - low_freq_factor) / (high_freq_factor - low_freq_factor)
  blended_F = (1 - smooth_F) * inverse_F / factor + smooth_F * inverse_F
  return jnp.where(wavelength_F < original_length / high_freq_factor, inverse_F,
                   jnp.where(wavelength_F > original_length / low_freq_factor, inverse_F / factor, blended_F))


def scaling_factor(encoding: Encoding, length: int) -> float:
  """s: the configured factor, or (factor 0) length / L, never below 1."""
  if encoding.rope_scaling_factor:
    return encoding.rope_scaling_factor
  return max(1.0, length / encoding.original_length)


def inverse_frequencies(encoding: Encoding, head_dim: int, length: int):
  """RoPE's inverse frequencies [head_dim // 2] under `model.rope_scaling` for a forward over `length` positions."""
  e, s = encoding, scaling_factor(encoding, length)
  if e.rope_scaling == 'none':
    return rope_inverse_frequencies(head_dim, e.rope_theta)
  if e.rope_scaling == 'linear':  # Position interpolation: positions / s, i.e. frequencies / s.
    return rope_inverse_frequencies(head_dim, e.rope_theta) / s
  if e.rope_scaling == 'ntk':
    return rope_inverse_frequencies(head_dim, ntk_theta(e.rope_theta, s, head_dim))
  if e.rope_scaling == 'dynamic':
    return rope_inverse_frequencies(head_dim, dynamic_ntk_theta(e.rope_theta, s, head_dim, length, e.original_length))
  if e.rope_scaling == 'yarn':
    return yarn_inverse_frequencies(head_dim, e.rope_theta, s, e.original_length, e.yarn_beta_fast, e.yarn_beta_slow)
  if e.rope_scaling == 'llama3':
    return llama3_inverse_frequencies(head_dim, e.rope_theta, s, e.original_length, e.llama3_low_freq_factor,
                                      e.llama3_high_freq_factor)
  raise ValueError(f'unknown model.rope_scaling {e.rope_scaling!r}')


@jax.custom_vjp
def rotate(x_BxTxHxDh, positions_BxT, inverse_frequencies_F):
  """x rotated by its tokens' positions, rotate-half layout: dims m and m + Dh/2 form one pair.

  The angles and the rotation are computed in float32, the result has x's dtype. Rotating q and
  k with the same positions makes their dot product a function of the position difference.
  """
  return _rotate(x_BxTxHxDh, positions_BxT, inverse_frequencies_F, 1.0)


def _rotate(x_BxTxHxDh, positions_BxT, inverse_frequencies_F, direction):
  # Each half is computed in float32 and rounded to x's dtype on its own (the same rounding as of
  # the whole), so no float32 array of q's or k's size is ever written out: on TPU a float32 array
  # whose last axis is Dh/2 takes a whole 128-lane tile per row, 4x its size at Dh 64.
  angles_BxTx1xF = (positions_BxT.astype(jnp.float32)[:, :, None] * inverse_frequencies_F)[:, :, None, :]
  cos_BxTx1xF, sin_BxTx1xF = jnp.cos(angles_BxTx1xF), direction * jnp.sin(angles_BxTx1xF)
  first, second = (half.astype(jnp.float32) for half in jnp.split(x_BxTxHxDh, 2, axis=-1))
  return jnp.concatenate([(first * cos_BxTx1xF - second * sin_BxTx1xF).astype(x_BxTxHxDh.dtype),
                          (second * cos_BxTx1xF + first * sin_BxTx1xF).astype(x_BxTxHxDh.dtype)], axis=-1)


def _rotate_fwd(x_BxTxHxDh, positions_BxT, inverse_frequencies_F):
  return _rotate(x_BxTxHxDh, positions_BxT, inverse_frequencies_F, 1.0), (positions_BxT, inverse_frequencies_F)


def _rotate_bwd(residuals, g_BxTxHxDh):
  # A rotation's transpose is the rotation by the opposite angles, computed as forward is. (Autodiff
  # would sum each half's two cotangents in float32 and write them out before rounding.)
  positions_BxT, inverse_frequencies_F = residuals
  return _rotate(g_BxTxHxDh, positions_BxT, inverse_frequencies_F, -1.0), None, None


rotate.defvjp(_rotate_fwd, _rotate_bwd)


# ---------------------------------------------------------------------------------------------
# Multiplier on q.


def logn_scale(positions_BxT, original_length: int):
  """Log-n scaling per query: max(1, ln(i + 1) / ln L), exactly 1 within the training length."""
  i = positions_BxT.astype(jnp.float32)
  return jnp.maximum(1.0, jnp.log(i + 1.0) / math.log(original_length))


def llama4_scale(positions_BxT, floor_scale: float, attn_scale: float):
  """Llama 4's temperature per query: 1 + attn_scale ln(floor((i + 1) / floor_scale) + 1), 1 below floor_scale - 1."""
  i = positions_BxT.astype(jnp.float32)
  return 1.0 + attn_scale * jnp.log(jnp.floor((i + 1.0) / floor_scale) + 1.0)


def query_scale(encoding: Encoding, positions_BxT, length: int, rotated: bool = True):
  """The position-dependent multiplier on q, [B, T] float32, or None when there is none.

  rotated: whether this layer's q and k were rotated (False on a hybrid's NoPE layers: no YaRN factor)."""
  scale = None
  if encoding.position == 'rope' and rotated and encoding.rope_scaling == 'yarn':
    factor = yarn_attention_factor(scaling_factor(encoding, length))
    if factor != 1.0:
      scale = jnp.full(positions_BxT.shape, factor ** 2, jnp.float32)
  if encoding.logn:
    logn = logn_scale(positions_BxT, encoding.original_length)
    scale = logn if scale is None else scale * logn
  if encoding.llama4_scaling:
    llama4 = llama4_scale(positions_BxT, encoding.llama4_floor_scale, encoding.llama4_attn_scale)
    scale = llama4 if scale is None else scale * llama4
  return scale


# ---------------------------------------------------------------------------------------------
# Bias on the logits.


def alibi_slopes(num_heads: int):
  """ALiBi's m_h: 2^(-8 h / H) for h = 1 .. H when H is a power of two; otherwise the slopes of the
  largest power of two n below H, then every other slope of 2n for the remaining heads. float32 [H]."""

  def powers_of_two(n):
    return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

  n = 2 ** math.floor(math.log2(num_heads))
  return jnp.asarray(powers_of_two(n) + powers_of_two(2 * n)[0::2][:num_heads - n], jnp.float32)


def alibi_bias(slopes_H, q_positions_BxQ, k_positions_BxS):
  """-m_h (i - j): bias_BxHxQxS float32. Only j <= i is ever visible, so it is never positive there."""
  distance_BxQxS = (q_positions_BxQ[:, :, None] - k_positions_BxS[:, None, :]).astype(jnp.float32)
  return -slopes_H[None, :, None, None] * distance_BxQxS[:, None]


# KERPLE-log's r1, r2 > 0 are learned; they train as softplus of unconstrained parameters, which
# start where r1 = r2 = 1.
KERPLE_INIT = math.log(math.e - 1)


def kerple_bias(params, q_positions_BxQ, k_positions_BxS):
  """KERPLE-log: -r1_h ln(1 + r2_h (i - j)) with r = softplus(params): bias_BxHxQxS float32.

  params = (r1_raw_H, r2_raw_H). The distance is clipped at 0: keys after the query are masked anyway.
  """
  r1_H, r2_H = (jax.nn.softplus(p.astype(jnp.float32)) for p in params)
  distance_BxQxS = jnp.maximum(q_positions_BxQ[:, :, None] - k_positions_BxS[:, None, :], 0).astype(jnp.float32)
  return -r1_H[None, :, None, None] * jnp.log1p(r2_H[None, :, None, None] * distance_BxQxS[:, None])


def bias(encoding: Encoding, num_heads: int, learned=None):
  """The logits' bias hook, (fn, params) with fn(params, q_positions_BxQ, k_positions_BxS) -> bias_BxHxQxS,
  or None. Kernels evaluate it block by block from positions; `learned` holds a learned bias's
  parameters (KERPLE's), whose gradients every kernel returns."""
  if encoding.position == 'alibi':
    return alibi_bias, alibi_slopes(num_heads)
  if encoding.position == 'kerple':
    return kerple_bias, learned
  return None


# ---------------------------------------------------------------------------------------------


def apply(encoding: Encoding, q_BxTxHxDh, k_BxTxKxDh, positions_BxT, length: int, uses_rope=None):
  """q and k with the rotation and the q multiplier applied ('nope' without log-n: unchanged).

  length: the forward's context length (the cache length when decoding), which dynamic NTK and
  factor-0 scalings read; positions_BxT: each token's position. uses_rope: this layer's flag
  (layer_flags): None follows encoding.position; a bool decides in Python; a traced boolean scalar
  (a scan over layers carries it as data) computes both and selects, each result exactly the bool's.
  """
  if encoding.position not in POSITIONS:
    raise ValueError(f'unknown position encoding {encoding.position!r}')
  if uses_rope is None:
    uses_rope = encoding.position == 'rope'
  if isinstance(uses_rope, (bool, np.bool_)):
    return _apply(encoding, q_BxTxHxDh, k_BxTxKxDh, positions_BxT, length, bool(uses_rope))
  q_rope, k_rope = _apply(encoding, q_BxTxHxDh, k_BxTxKxDh, positions_BxT, length, True)
  q_nope, k_nope = _apply(encoding, q_BxTxHxDh, k_BxTxKxDh, positions_BxT, length, False)
  return jnp.where(uses_rope, q_rope, q_nope), jnp.where(uses_rope, k_rope, k_nope)


def _apply(encoding: Encoding, q_BxTxHxDh, k_BxTxKxDh, positions_BxT, length: int, rotated: bool):
  if rotated:
    inverse_frequencies_F = inverse_frequencies(encoding, q_BxTxHxDh.shape[-1], length)
    q_BxTxHxDh = rotate(q_BxTxHxDh, positions_BxT, inverse_frequencies_F)
    k_BxTxKxDh = rotate(k_BxTxKxDh, positions_BxT, inverse_frequencies_F)
  scale_BxT = query_scale(encoding, positions_BxT, length, rotated)
  if scale_BxT is not None:
    q_BxTxHxDh = (q_BxTxHxDh.astype(jnp.float32) * scale_BxT[:, :, None, None]).astype(q_BxTxHxDh.dtype)
  return q_BxTxHxDh, k_BxTxKxDh
