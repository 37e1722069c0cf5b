"""Swin Transformer (Liu et al. 2021) with a pluggable head.

Patches of `patch_size` are embedded by a strided conv + LayerNorm; four stages
of Swin blocks follow, each stage but the last ending in patch merging (2x2
neighbouring tokens concatenated, LayerNorm, linear 4C -> 2C). A Swin block is

  x <- x + drop_path(W-MSA(LN(x)))      (SW-MSA in every second block)
  x <- x + drop_path(MLP(LN(x)))

where W-MSA is self-attention inside non-overlapping `window_size` windows
with a learned relative position bias, and SW-MSA does the same after a cyclic
shift of the feature map by window_size // 2, with an attention mask so that
tokens only attend to tokens that were neighbours before the shift. A stage
whose resolution is not larger than the window uses one window and no shift.
The features are the global average of the final LayerNorm's tokens.

Feature maps are kept as (B, H, W, C). Parameters are float32, `dtype` is the
compute dtype; softmax, features and logits are float32. Each stage's
resolution must be a multiple of its window size, and even before merging.
"""

from typing import Any, Mapping, Sequence

import flax.linen as nn
from flax.core import FrozenDict
import jax.numpy as jnp
import numpy as np

from grassq.models.common import (dense, drop_path_rates, head_outputs, layer_norm,
                                  mlp_residual, patch_embed, residual, self_attention,
                                  trunc_normal)

Dtype = Any

LN_EPSILON = 1e-5  # Swin's LayerNorm (PyTorch's default)

MASKED = -100.0  # additive attention bias between tokens of different regions


def window_partition(x, window_size):
  """(B, H, W, C) -> (B, num_windows, window_size**2, C), windows in row-major order."""
  b, h, w, c = x.shape
  ws = window_size
  x = x.reshape(b, h // ws, ws, w // ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // ws) * (w // ws), ws * ws, c)


def window_merge(windows, h, w):
  """Inverse of `window_partition`: (B, num_windows, ws**2, C) -> (B, H, W, C)."""
  b, _, n, c = windows.shape
  ws = int(round(n**0.5))
  x = windows.reshape(b, h // ws, w // ws, ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


def relative_position_index(window_size):
  """(N, N) int index into the ((2 ws - 1)**2, heads) bias table, N = ws**2."""
  ws = window_size
  coords = np.stack(np.meshgrid(np.arange(ws), np.arange(ws), indexing="ij")).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (ws - 1)
  return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


def shifted_window_mask(h, w, window_size, shift):
  """(num_windows, N, N) additive mask of SW-MSA: 0 within a region, MASKED across.

  After the cyclic shift, a window at the border holds tokens from up to four
  regions of the original map that are not neighbours; they must not attend to
  each other.
  """
  region = np.zeros((1, h, w, 1), np.int32)
  bands = lambda n: (slice(0, n - window_size), slice(n - window_size, n - shift),
                     slice(n - shift, n))
  label = 0
  for rows in bands(h):
    for cols in bands(w):
      region[:, rows, cols, :] = label
      label += 1
  windows = window_partition(region, window_size)[0, ..., 0]  # (num_windows, N)
  return np.where(windows[:, :, None] != windows[:, None, :], MASKED, 0.0).astype(np.float32)


class WindowAttention(nn.Module):
  """Multi-head self-attention within windows, with a relative position bias.

  Attributes:
    num_heads: attention heads.
    window_size: side of the square windows.
    dtype: compute dtype.
  """
  num_heads: int
  window_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, windows, mask=None):
    """windows (B, num_windows, N, C); mask None or (num_windows, N, N) additive."""
    ws = self.window_size
    table = self.param("relative_position_bias_table", trunc_normal,
                       ((2 * ws - 1) ** 2, self.num_heads), jnp.float32)
    bias = table[relative_position_index(ws)].transpose(2, 0, 1)  # (heads, N, N)
    if mask is not None:
      bias = bias + mask[:, None]  # (num_windows, heads, N, N)
    return self_attention(windows, self.num_heads, self.dtype, bias)


class SwinBlock(nn.Module):
  """One Swin block: (shifted) window attention, then an MLP, both pre-norm residual."""
  num_heads: int
  window_size: int = 7
  shift: int = 0
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train=False):
    _, h, w, _ = x.shape
    ws, s = self.window_size, self.shift
    y = layer_norm(self.dtype, "norm1", LN_EPSILON)(x)
    mask = None
    if s:
      y = jnp.roll(y, (-s, -s), axis=(1, 2))
      mask = jnp.asarray(shifted_window_mask(h, w, ws, s))
    y = WindowAttention(self.num_heads, ws, self.dtype, name="attn")(
        window_partition(y, ws), mask)
    y = window_merge(y, h, w)
    if s:
      y = jnp.roll(y, (s, s), axis=(1, 2))
    x = residual(self, x, y, 1, self.drop_path, train)
    return mlp_residual(self, x, self.mlp_ratio, self.drop_path, train, self.dtype, LN_EPSILON)


class PatchMerging(nn.Module):
  """Halves the resolution and doubles the width: concat 2x2 tokens, LN, linear 4C -> 2C."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    _, h, w, c = x.shape
    if h % 2 or w % 2:
      raise ValueError(f"patch merging needs an even resolution, got {h}x{w}")
    # The order of Swin's code: (0,0), (1,0), (0,1), (1,1) offsets in (row, col).
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                        axis=-1)
    x = layer_norm(self.dtype, "norm", LN_EPSILON)(x)
    return dense(2 * c, self.dtype, "reduction", use_bias=False)(x)


class SwinTransformer(nn.Module):
  """Swin backbone + named head.

  Attributes:
    num_classes: number of classes of the head.
    patch_size: side of the patches embedded as tokens (4).
    embed_dim: width C of the first stage (96 for Swin-T); doubles per stage.
    depths: Swin blocks per stage ((2, 2, 6, 2) for Swin-T).
    num_heads: attention heads per stage ((3, 6, 12, 24)).
    window_size: side of the attention windows (7).
    mlp_ratio: MLP hidden width / C (4).
    drop_path_rate: stochastic depth of the last block, linear in depth from 0
      over all blocks (0.2 for Swin-T); needs a 'dropout' RNG when training.
    head: a name in `grassq.heads.HEADS`; sees the pooled features.
    head_kwargs: extra fields of the head.
    dtype: compute dtype; parameters stay float32.
  """
  num_classes: int
  patch_size: int = 4
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  head: str = "linear"
  head_kwargs: Mapping[str, Any] = FrozenDict()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    """Maps images (B, H, W, C) to logits (B, num_classes) float32.

    Args:
      x: normalized images, NHWC.
      train: enable stochastic depth.
      return_features: also return the pooled features (B, embed_dim * 2**(stages-1)),
        float32.

    Returns:
      logits, or (logits, features) when `return_features`.
    """
    if len(self.depths) != len(self.num_heads):
      raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} differ in length")
    x = patch_embed(x, self.patch_size, self.embed_dim, self.dtype)
    x = layer_norm(self.dtype, "patch_norm", LN_EPSILON)(x)
    rates = iter(drop_path_rates(self.drop_path_rate, sum(self.depths)))
    for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
      h, w = x.shape[1:3]
      ws = min(self.window_size, h, w)
      if h % ws or w % ws:
        raise ValueError(f"stage {i + 1}: resolution {h}x{w} is not a multiple of the "
                         f"window size {ws}")
      shift = ws // 2 if min(h, w) > self.window_size else 0
      for j in range(depth):
        x = SwinBlock(heads, ws, shift if j % 2 else 0, self.mlp_ratio, next(rates),
                      self.dtype, name=f"stage{i + 1}_block{j}")(x, train)
      if i < len(self.depths) - 1:
        x = PatchMerging(self.dtype, name=f"stage{i + 1}_merge")(x)
    x = layer_norm(self.dtype, "norm", LN_EPSILON)(x)
    return head_outputs(self, jnp.mean(x.astype(jnp.float32), axis=(1, 2)), return_features)
