"""Pieces shared by the grassq models: the head outputs, and the transformer layers of ViT and Swin.

* `head_outputs`: the named head on the pooled features, float32 logits (and the features), as
  every grassq model returns them;
* transformer layers (timm's layout and initialization, so timm weights map one to one):
  `dense`, `layer_norm`, `patch_embed`, `self_attention`, `Mlp`, `DropPath`, `layer_scale`,
  `residual` (layer scale + stochastic depth + skip), `mlp_residual` (the pre-norm MLP half of a
  block) and `drop_path_rates`.

Helpers that take `module` or build layers are called inside a compact method: their parameters
and submodules belong to the caller, under the names given.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from grassq.heads import make_head

Dtype = Any

# timm/DeiT initialize linear layers and embeddings with a truncated normal, std 0.02.
trunc_normal = nn.initializers.truncated_normal(0.02)


def head_outputs(model: nn.Module, features: jax.Array, return_features: bool = False):
  """`model`'s head (``model.head`` in `grassq.heads.HEADS`, ``model.head_kwargs``, submodule
  ``head``) on `features`: float32 logits, or (logits, features) when `return_features`."""
  logits = make_head(model.head, model.num_classes, name="head", **model.head_kwargs)(features)
  logits = logits.astype(jnp.float32)
  return (logits, features) if return_features else logits


# ----------------------------------------------------------------------------- transformers


def dense(features, dtype, name, use_bias=True):
  return nn.Dense(features, use_bias=use_bias, kernel_init=trunc_normal,
                  dtype=dtype, param_dtype=jnp.float32, name=name)


def layer_norm(dtype, name, epsilon=1e-6):
  return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32, name=name)


def patch_embed(x, patch_size, embed_dim, dtype):
  """Non-overlapping p x p patches of images (B, H, W, C) embedded by a strided conv
  ``patch_embed``: (B, H/p, W/p, embed_dim) in `dtype`."""
  p = patch_size
  if x.shape[1] % p or x.shape[2] % p:
    raise ValueError(f"image size {x.shape[1]}x{x.shape[2]} is not a multiple of "
                     f"patch_size={p}")
  return nn.Conv(embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=dtype,
                 param_dtype=jnp.float32, name="patch_embed")(x.astype(dtype))


def self_attention(x, num_heads, dtype, bias=None):
  """Multi-head self-attention over the token axis (-2) of x (..., N, C).

  Its dense layers `qkv` (one fused projection whose output is (3, heads, head_dim), PyTorch's
  layout) and `proj` become submodules of the caller.

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
  qkv = dense(3 * c, dtype, "qkv")(x).reshape(*lead, n, 3, num_heads, head_dim)
  q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
  logits = jnp.einsum("...qhd,...khd->...hqk", q * head_dim**-0.5, k)
  logits = logits.astype(jnp.float32)
  if bias is not None:
    logits = logits + bias
  attn = jax.nn.softmax(logits, axis=-1).astype(dtype)
  out = jnp.einsum("...hqk,...khd->...qhd", attn, v).reshape(*lead, n, c)
  return dense(c, dtype, "proj")(out)


class Mlp(nn.Module):
  """Two linear layers with a GELU between (exact erf GELU, as PyTorch's)."""
  hidden_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.gelu(dense(self.hidden_dim, self.dtype, "fc1")(x), approximate=False)
    return dense(x.shape[-1], self.dtype, "fc2")(y)


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


def layer_scale(module, x, init, name):
  """x * gamma with a per-channel parameter gamma = init (no-op when init is None)."""
  if init is None:
    return x
  gamma = module.param(name, nn.initializers.constant(init), (x.shape[-1],), jnp.float32)
  return x * gamma.astype(x.dtype)


def residual(module, x, y, index: int, drop_path: float, train: bool,
             layer_scale_init: Optional[float] = None):
  """x + drop_path(gamma * y): residual join `index` of a pre-norm block (1: attention, 2: MLP),
  with layer scale ``gamma_{index}`` (when `layer_scale_init` is set) and ``drop_path{index}``."""
  y = layer_scale(module, y, layer_scale_init, f"gamma_{index}")
  return x + DropPath(drop_path, name=f"drop_path{index}")(y, train)


def mlp_residual(module, x, mlp_ratio: float, drop_path: float, train: bool, dtype,
                 epsilon: float, layer_scale_init: Optional[float] = None):
  """The MLP half of a pre-norm block: x + drop_path(gamma_2 * MLP(LN(x))), with submodules
  ``norm2``, ``mlp`` (hidden width C * mlp_ratio), ``drop_path2`` and parameter ``gamma_2``."""
  y = Mlp(int(x.shape[-1] * mlp_ratio), dtype, name="mlp")(layer_norm(dtype, "norm2", epsilon)(x))
  return residual(module, x, y, 2, drop_path, train, layer_scale_init)


def drop_path_rates(rate, depth):
  """Stochastic-depth rate of each block: linear from 0 to `rate` (Huang et al. 2016)."""
  return [rate * i / max(depth - 1, 1) for i in range(depth)]
