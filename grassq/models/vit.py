"""Vision Transformer with layer scale (DeiT III, Touvron et al. 2022) and a pluggable head.

`VisionTransformer` is the pre-norm ViT of DeiT III: 16x16 patches embedded by a
strided conv, learned position embeddings added to the patch tokens only (the
class token gets none), then `depth` encoder blocks

  x <- x + drop_path(gamma_1 * MHSA(LN(x)))
  x <- x + drop_path(gamma_2 * MLP(LN(x)))

with per-channel layer-scale vectors gamma initialized to `layer_scale_init`
(1e-4), a final LayerNorm, and the class token as the feature vector. The
building blocks (`self_attention`, `Mlp`, `DropPath`, ...) live in
`grassq.models.common`, shared with Swin.

Linear layers keep PyTorch's layout (one fused `qkv` projection whose output is
(3, heads, head_dim)), so timm/DeiT weights map one to one. Parameters are
float32, `dtype` is the compute dtype; softmax, features and logits are float32.
The image size is read from the input: the position embedding has one row per
patch of the image the model is initialized with.
"""

from typing import Any, Mapping, Optional

import flax.linen as nn
from flax.core import FrozenDict
import jax.numpy as jnp

from grassq.models.common import (DropPath, Mlp, drop_path_rates, head_outputs, layer_norm,
                                  layer_scale, mlp_residual, patch_embed, residual,
                                  self_attention, trunc_normal)

__all__ = ["Attention", "DropPath", "EncoderBlock", "Mlp", "VisionTransformer",
           "drop_path_rates", "layer_norm", "layer_scale", "self_attention", "trunc_normal"]

Dtype = Any

LN_EPSILON = 1e-6  # timm's ViT LayerNorm


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
    x = residual(self, x, y, 1, self.drop_path, train, self.layer_scale_init)
    return mlp_residual(self, x, self.mlp_ratio, self.drop_path, train, self.dtype, LN_EPSILON,
                        self.layer_scale_init)


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
    x = patch_embed(x, self.patch_size, self.embed_dim, self.dtype)
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
    return head_outputs(self, x[:, 0].astype(jnp.float32), return_features)
