"""Per-layer cost of a grassq model: parameters, MACs, and size / BOPs at given bit-widths.

Shapes come from `jax.eval_shape`, so even ImageNet-size models cost no compute. Layer names are
those of `grassq.quant.qresnet.layer_names` (the keys of the per-layer bit dict): conv modules by
their path (``stage1_block0/conv1``), the classifier as ``head``. A Grassmann head counts its
bases (C·n·k weights) and the projections Sᵀx (C·n·k MACs); its norms are negligible.

Conventions (HAWQV3's): BOPs = MACs × b_w × b_a at batch 1; the model size counts every
parameter at its layer's bit-width (a BatchNorm folds into the conv before it; parameters outside
any conv/dense layer count at ``other_bits``).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from grassq.heads import GrassmannHead

MIB = 2.0**20


def layer_costs(model, image_shape: Sequence[int]) -> dict[str, dict[str, int]]:
  """{layer: {"params": weights of the layer, "macs": multiply-accumulates at batch 1}}."""

  def run():
    x = jnp.zeros((1, *image_shape), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    _, state = model.apply(variables, x, capture_intermediates=lambda m, _: isinstance(
        m, (nn.Conv, nn.Dense, GrassmannHead)), mutable=["intermediates"])
    return variables["params"], state["intermediates"]

  params, inter = jax.eval_shape(run)
  costs = {}
  for path, out in jax.tree_util.tree_flatten_with_path(inter)[0]:
    keys = [k.key for k in path[:-2]]  # drop "__call__" and the tuple index
    kernel = params
    for k in keys:
      kernel = kernel[k]
    kernel = (kernel["kernel"] if "kernel" in kernel else kernel["bases"]).shape
    spatial = int(np.prod(out.shape[1:-1])) if len(out.shape) > 2 else 1
    name = "head" if keys[0] == "head" else "/".join(keys)
    costs[name] = {"params": int(np.prod(kernel)), "macs": int(np.prod(kernel)) * spatial}
  return costs


def total_params(model, image_shape: Sequence[int]) -> int:
  p = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape))))
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(p["params"])))


def model_size_mib(costs: Mapping, bits: Mapping[str, int] | int, all_params: int,
                   other_bits: int = 8) -> float:
  """Size in MiB with each layer's weights at its bit-width and the rest at `other_bits`."""
  bits = {k: bits for k in costs} if isinstance(bits, int) else bits
  layer = sum(c["params"] * bits[k] for k, c in costs.items())
  rest = all_params - sum(c["params"] for c in costs.values())
  return (layer + rest * other_bits) / 8 / MIB


def bops(costs: Mapping, w_bits: Mapping[str, int] | int,
         a_bits: Mapping[str, int] | int | None = None) -> float:
  """Bit operations Σ MACs × b_w × b_a (a layer's activation bits default to its weight bits)."""
  w = {k: w_bits for k in costs} if isinstance(w_bits, int) else w_bits
  a = w if a_bits is None else ({k: a_bits for k in costs} if isinstance(a_bits, int) else a_bits)
  return float(sum(c["macs"] * w[k] * a[k] for k, c in costs.items()))
