"""Vision Transformer with layer scale (DeiT III, Touvron et al. 2022) and a pluggable head.

`VisionTransformer` is the pre-norm ViT of DeiT III: 16x16 patches embedded by a
strided conv, learned position embeddings added to the patch tokens only (the
class token gets none), then `depth` encoder blocks

  x <- x + drop_path(gamma_1 * MHSA(LN(x)))
  x <- x + drop_path(gamma_2 * MLP(LN(x)))

with per-channel layer-scale vectors gamma initialized to `layer_scale_init`
(1e-4), a final LayerNorm, and the class token as the feature vector. The
building blocks (`self_attention`, `Mlp`, `DropPath`) are shared with Swin.

Linear layers keep PyTorch's layout (one fused `qkv` projection whose output is
(3, heads, head_dim)), so timm/DeiT weights map one to one. Parameters are
float32, `dtype` is the compute dtype; softmax, features and logits are float32.
The image size is read from the input: the position embedding has one row per
patch of the image the model is initialized with.
"""

from typing import Any, Mapping, Optional

import flax.linen as nn
from flax.core import FrozenDict
import jax
import jax.numpy as jnp

from grassq.heads import make_head

Dtype = Any

# timm/DeiT initialize linear layers and embeddings with a truncated normal, std 0.02.
trunc_normal = nn.initializers.truncated_normal(0.02)


def _dense(features, dtype, name, use_bias=True):
  return nn.Dense(features, use_bias=use_bias, kernel_init=trunc_normal,
                  dtype=dtype, param_dtype=jnp.float32, name=name)


def self_attention(x, num_heads, dtype, bias=None):
  """Multi-head self-attention over the token axis (-2) of x (..., N, C).

  Call it inside a compact method: its dense layers `qkv` and `proj` become
  submodules of the caller.

  Args:
    x: tokens (..., N, C); C must be divisible by num_heads.
    num_heads: number of heads h.
    dtype: compute dtype; the softmax is computed in float32.
    bias: None or an additive bias broadcastable to (..., h, N, N) (relative
      position bias, attention mask).

  Returns:
    (..., N, C) in `dtype`.
  """
  *lead, n, c = x.shape
  if c % num_heads:
    raise ValueError(f"width {c} is not divisible by num_heads={num_heads}")
  head_dim = c // num_heads
  qkv = _dense(3 * c, dtype, "qkv")(x).reshape(*lead, n, 3, num_heads, head_dim)
  q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
  logits = jnp.einsum("...qhd,...khd->...hqk", q * head_dim**-0.5, k)
  logits = logits.astype(jnp.float32)
  if bias is not None:
    logits = logits + bias
  attn = jax.nn.softmax(logits, axis=-1).astype(dtype)
  out = jnp.einsum("...hqk,...khd->...qhd", attn, v).reshape(*lead, n, c)
  return _dense(c, dtype, "proj")(out)


class Mlp(nn.Module):
  """Two linear layers with a GELU between (exact erf GELU, as PyTorch's)."""
  hidden_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.gelu(_dense(self.hidden_dim, self.dtype, "fc1")(x), approximate=False)
    return _dense(x.shape[-1], self.dtype, "fc2")(y)


class DropPath(nn.Module):
  """Stochastic depth: drops a whole residual branch per example with probability `rate`.

  Kept branches are scaled by 1 / (1 - rate). Active only when `train` and
  rate > 0; then it draws from the 'dropout' RNG stream.
  """
  rate: float = 0.0

  @nn.compact
  def __call__(self, x, train=False):
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep,
                                (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


def layer_norm(dtype, name, epsilon=1e-6):
  return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32, name=name)


def layer_scale(module, x, init, name):
  """x * gamma with a per-channel parameter gamma = init (no-op when init is None)."""
  if init is None:
    return x
  gamma = module.param(name, nn.initializers.constant(init), (x.shape[-1],), jnp.float32)
  return x * gamma.astype(x.dtype)


class Attention(nn.Module):
  """Multi-head self-attention (`self_attention` as a module, for the param tree)."""
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return self_attention(x, self.num_heads, self.dtype)


class EncoderBlock(nn.Module):
  """Pre-norm transformer block with layer scale and stochastic depth (DeiT III)."""
  num_heads: int
  mlp_ratio: float = 4.0
  layer_scale_init: Optional[float] = 1e-4
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train=False):
    y = Attention(self.num_heads, self.dtype, name="attn")(layer_norm(self.dtype, "norm1")(x))
    y = layer_scale(self, y, self.layer_scale_init, "gamma_1")
    x = x + DropPath(self.drop_path, name="drop_path1")(y, train)
    y = Mlp(int(x.shape[-1] * self.mlp_ratio), self.dtype, name="mlp")(
        layer_norm(self.dtype, "norm2")(x))
    y = layer_scale(self, y, self.layer_scale_init, "gamma_2")
    return x + DropPath(self.drop_path, name="drop_path2")(y, train)


def drop_path_rates(rate, depth):
  """Stochastic-depth rate of each block: linear from 0 to `rate` (Huang et al. 2016)."""
  return [rate * i / max(depth - 1, 1) for i in range(depth)]


class VisionTransformer(nn.Module):
  """ViT backbone (DeiT III flavour) + named head.

  Attributes:
    num_classes: number of classes of the head.
    patch_size: side of the square patches (16); must divide the image size.
    embed_dim: token width (384 for ViT-S).
    depth: number of encoder blocks (12).
    num_heads: attention heads (6 for ViT-S).
    mlp_ratio: MLP hidden width / embed_dim (4).
    layer_scale_init: initial value of the layer-scale vectors (1e-4 as DeiT
      III); None for a plain ViT.
    drop_path_rate: stochastic depth of the last block, linear in depth from 0;
      needs a 'dropout' RNG when training with it > 0.
    head: a name in `grassq.heads.HEADS`; sees the final class token.
    head_kwargs: extra fields of the head.
    dtype: compute dtype; parameters stay float32.
  """
  num_classes: int
  patch_size: int = 16
  embed_dim: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  layer_scale_init: Optional[float] = 1e-4
  drop_path_rate: float = 0.0
  head: str = "linear"
  head_kwargs: Mapping[str, Any] = FrozenDict()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    """Maps images (B, H, W, C) to logits (B, num_classes) float32.

    Args:
      x: normalized images, NHWC, H and W multiples of patch_size.
      train: enable stochastic depth.
      return_features: also return the final class token (B, embed_dim), float32.

    Returns:
      logits, or (logits, features) when `return_features`.
    """
    _, h, w, _ = x.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f"image size {h}x{w} is not a multiple of patch_size={p}")
    x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                param_dtype=jnp.float32, name="patch_embed")(x.astype(self.dtype))
    b = x.shape[0]
    x = x.reshape(b, -1, self.embed_dim)
    pos_embed = self.param("pos_embed", trunc_normal, (1, *x.shape[1:]), jnp.float32)
    cls_token = self.param("cls_token", trunc_normal, (1, 1, self.embed_dim), jnp.float32)
    x = x + pos_embed.astype(self.dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(self.dtype), (b, 1, self.embed_dim)),
                         x], axis=1)
    for i, rate in enumerate(drop_path_rates(self.drop_path_rate, self.depth)):
      x = EncoderBlock(self.num_heads, self.mlp_ratio, self.layer_scale_init, rate,
                       self.dtype, name=f"block{i}")(x, train)
    x = layer_norm(self.dtype, "norm")(x)
    features = x[:, 0].astype(jnp.float32)
    logits = make_head(self.head, self.num_classes, name="head", **self.head_kwargs)(features)
    logits = logits.astype(jnp.float32)
    return (logits, features) if return_features else logits
