"""HAWQV3 layer sensitivities: Hutchinson Hessian traces in BN-folded coordinates.

HAWQV3 ranks layers by Omega_l(b) = Tr(H_l)/n_l * ||Q_b(W_l) - W_l||^2, the average Hessian
trace of layer l's block of the loss Hessian times the squared error of quantizing its weights
to b bits. Both factors are taken in the same coordinates: the weights the integer network
quantizes, i.e. every conv's kernel with its BatchNorm (evaluation mode) folded in, and the
classifier's kernel.

* `hutchinson_trace(loss_fn, params, batches, key)`: per-layer block traces of any loss by
  Hutchinson's estimator (Rademacher probes, forward-over-reverse Hessian-vector products,
  several probes per step under `jax.vmap`, stopped by a relative standard-error tolerance);
* `folded_weights(model, variables)`: a float `grassq.models.ResNet`'s or `InceptionV3`'s folded
  weights, keyed by the layer names of its QAT twin (`grassq.quant.qresnet.layer_names`,
  `grassq.quant.qinception.layer_names`, those of `grassq.quant.cost.layer_costs`), and the
  inverse map;
* `folded_loss(model, variables)`: the eval-mode cross-entropy as a function of those weights;
* `sensitivity(traces, folded, bits)`: Omega per layer and bit-width, with the same per-channel
  fake quantizer as the QAT layers; `layer_sensitivities(...)` chains the three.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from grassq.models.inception import InceptionV3
from grassq.models.resnet import ResNet
from grassq.quant import qat, qinception, qresnet, quantizers

PyTree = Any


class TraceEstimate(NamedTuple):
  """Hutchinson estimate of one layer's Hessian block trace, per parameter.

  Attributes:
    trace_per_param: Tr(H_l) / n_l, the mean of the probes' v_l^T (H v)_l divided by n_l.
    stderr_per_param: standard error of that mean (sample std / sqrt(num_probes)), / n_l.
    num_probes: number of Rademacher probes averaged.
    num_params: n_l, the number of parameters of the layer.
  """

  trace_per_param: float
  stderr_per_param: float
  num_probes: int
  num_params: int

  @property
  def trace(self) -> float:
    """The block trace Tr(H_l) itself."""
    return self.trace_per_param * self.num_params


# ----------------------------------------------------------------------------- Hutchinson


def _check_params(params):
  if not isinstance(params, Mapping):
    raise TypeError("params must be a dict {layer name: array or subtree}; got "
                    f"{type(params).__name__}")
  if not params:
    raise ValueError("params is empty: no layers to estimate")
  for name, sub in params.items():
    leaves = jax.tree_util.tree_leaves(sub)
    if not leaves:
      raise ValueError(f"layer {name!r} has no parameters")
    for leaf in leaves:
      if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
        raise TypeError(f"layer {name!r} has a non-float leaf of dtype {jnp.result_type(leaf)}")


def _batch_list(batches):
  if isinstance(batches, Mapping):
    raise TypeError("batches must be a sequence of batches, not a single batch; wrap it: [batch]")
  batches = list(batches)
  if not batches:
    raise ValueError("batches is empty: the Hessian needs at least one batch")
  return batches


def _rademacher_like(key, tree, num):
  """`num` Rademacher (+-1) probes shaped like `tree`, stacked on a new leading axis.

  One `jax.random.bits` call supplies 32 signs per uint32 word for all leaves: a PRNG call per
  leaf would inline one threefry per leaf, and XLA's compile time grows with their number.
  """
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  sizes = [int(np.prod(jnp.shape(x))) for x in leaves]
  words = jax.random.bits(key, (num, -(-sum(sizes) // 32)), jnp.uint32)
  shifts = jnp.arange(32, dtype=jnp.uint32)
  signs = ((words[:, :, None] >> shifts) & 1).reshape(num, -1)
  probes, start = [], 0
  for x, size in zip(leaves, sizes):
    s = signs[:, start:start + size].reshape(num, *jnp.shape(x))
    probes.append((2 * s.astype(jnp.result_type(x)) - 1))
    start += size
  return jax.tree_util.tree_unflatten(treedef, probes)


def _block_dots(a, b, num):
  """Per-probe inner products <a_p, b_p> over all leaves of two stacked trees -> (num,)."""
  xs, ys = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  dtype = jnp.result_type(*xs, jnp.float32)
  total = jnp.zeros((num,), dtype)
  for x, y in zip(xs, ys):
    total = total + jnp.sum((x * y).reshape(num, -1).astype(dtype), axis=1)
  return total


def hutchinson_trace(loss_fn: Callable[[PyTree, Any], jax.Array], params: Mapping[str, PyTree],
                     batches: Iterable[Any], key: jax.Array, *, probes_per_step: int = 4,
                     tol: float = 0.05, min_probes: int = 16, max_probes: int = 256
                     ) -> dict[str, TraceEstimate]:
  """Per-layer Hessian traces by Hutchinson's method, Tr(H_ll) = E[v_l^T (H v)_l].

  Each step draws `probes_per_step` Rademacher probes v over all of `params` and computes their
  Hessian-vector products at once (`jax.vmap` of `jax.jvp` of `jax.grad`, one jitted function);
  one probe gives every layer's block trace, v_l^T (H v)_l. The target is the Hessian of the
  mean of `loss_fn` over `batches` (each batch weighted equally): every probe's HVP is averaged
  over all the batches, so the only randomness is the probes'. Steps repeat until, for every
  layer, the standard error of the running mean is at most `tol` times its magnitude (checked
  once at least `min_probes` probes are in), or `max_probes` probes are spent (a layer whose
  trace is near zero, e.g. of mixed-sign curvature, may never meet a relative tolerance).
  The probes come from one `jax.random.bits` call over all parameters, so the estimate does
  not depend on how `params` are sharded; the jitted step leaves the partitioning to XLA.

  Args:
    loss_fn: loss_fn(params, batch) -> scalar; differentiable twice in params.
    params: {layer name: float array or subtree}; each top-level entry is one layer (block).
    batches: a finite iterable of batches, each passed to `loss_fn` as is (all are held).
    key: PRNG key; step r uses `jax.random.fold_in(key, r)`.
    probes_per_step: probes per vmapped HVP (memory grows with it).
    tol: relative standard-error tolerance (> 0).
    min_probes: probes before the tolerance is checked (>= 2).
    max_probes: most probes (>= min_probes); the last step's extra probes are dropped.

  Returns:
    {layer name: TraceEstimate}, in the order of `params`.

  Raises:
    TypeError: params not a dict, non-float parameters, a single batch instead of a list.
    ValueError: empty params or batches, non-positive tol, inconsistent probe counts.
    FloatingPointError: non-finite Hessian-vector products.
  """
  _check_params(params)
  batches = _batch_list(batches)
  try:
    ok = math.isfinite(float(tol)) and float(tol) > 0
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f"tol must be a positive finite number, got {tol!r}")
  tol = float(tol)
  if probes_per_step < 1:
    raise ValueError(f"probes_per_step must be >= 1, got {probes_per_step}")
  if min_probes < 2:
    raise ValueError(f"min_probes must be >= 2 (a standard error needs two), got {min_probes}")
  if max_probes < min_probes:
    raise ValueError(f"max_probes={max_probes} is below min_probes={min_probes}")
  names = list(params)
  num = int(probes_per_step)

  @jax.jit
  def quadratic_forms(params, step_key, batch):
    probes = _rademacher_like(step_key, params, num)
    grad = jax.grad(loss_fn)

    def hvp(v):
      return jax.jvp(lambda p: grad(p, batch), (params,), (v,))[1]

    hv = jax.vmap(hvp)(probes)
    return jnp.stack([_block_dots(probes[n], hv[n], num) for n in names])  # (layers, probes)

  samples, step = [], 0
  while True:
    step_key = jax.random.fold_in(key, step)
    total = None
    for batch in batches:
      q = quadratic_forms(params, step_key, batch)
      total = q if total is None else total + q
    q = np.asarray(jax.device_get(total), np.float64) / len(batches)
    if not np.all(np.isfinite(q)):
      raise FloatingPointError("non-finite Hessian-vector products: check the loss and params")
    samples.append(q)
    step += 1
    n = sum(s.shape[1] for s in samples)
    if n >= min_probes:
      all_q = np.concatenate(samples, axis=1)[:, :max_probes]
      mean = all_q.mean(axis=1)
      stderr = all_q.std(axis=1, ddof=1) / math.sqrt(all_q.shape[1])
      if n >= max_probes or np.all(stderr <= tol * np.abs(mean)):
        break

  result = {}
  for i, name in enumerate(names):
    size = sum(int(np.prod(jnp.shape(x))) for x in jax.tree_util.tree_leaves(params[name]))
    result[name] = TraceEstimate(float(mean[i]) / size, float(stderr[i]) / size,
                                 int(all_q.shape[1]), size)
  return result


# ----------------------------------------------------------------------------- folded weights


def _layer_order(model):
  """Sort key of layer names in the forward order of the QAT twin's `layer_names`."""
  if isinstance(model, InceptionV3):
    index = {name: i for i, name in enumerate(qinception.layer_names(model))}
    return lambda name: (index.get(name, len(index)), name)
  return qresnet.forward_order


def _conv_paths(tree, prefix=()):
  """Paths of the conv modules (a `kernel`, a name with "conv") outside the head."""
  for key, sub in tree.items():
    if not isinstance(sub, Mapping) or (not prefix and key == "head"):
      continue
    if "kernel" in sub and "conv" in key:
      yield prefix + (key,)
    else:
      yield from _conv_paths(sub, prefix + (key,))


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _bn_epsilons(model, variables, in_channels):
  """{BN module path: epsilon}, read from the modules the model actually calls."""
  eps = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm):
      eps[tuple(context.module.path)] = float(context.module.epsilon)
    return next_fun(*args, **kwargs)

  # shapes only (no compute): an image size every stem and stage accepts
  side = 299 if isinstance(model, InceptionV3) and model.stem == "imagenet" else 64
  x = jax.ShapeDtypeStruct((1, side, side, in_channels), jnp.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  return eps


def _kernel_as_bases(kernel, num_classes):
  """Inverse of `qat.bases_as_kernel`: (n, C*k) -> (C, n, k)."""
  n, ck = kernel.shape
  return jnp.transpose(kernel.reshape(n, num_classes, ck // num_classes), (1, 0, 2))


def folded_weights(model: ResNet | InceptionV3, variables: Mapping
                   ) -> tuple[dict[str, jax.Array], Callable[[Mapping[str, jax.Array]], dict]]:
  """The BN-folded weights of a float ResNet or InceptionV3, keyed by its QAT layer names, and
  their inverse.

  Each conv followed by BatchNorm (ResNet: ``X/convN`` with ``X/bnN``; InceptionV3: a unit's
  ``X/conv`` with ``X/bn``; eval mode) gives W_f = W * gamma / sqrt(var + eps) per output
  channel (eps: the model's BN epsilon); the linear head gives its dense kernel, the Grassmann
  head its bases as the (n, C*k) kernel of `qat.bases_as_kernel` (one output channel per basis
  column, as `QuantGrassmannHead` quantizes them). Every folded weight has its output channels
  on the last axis. Keys are exactly the QAT twin's layer names, in forward order:
  ``qresnet.layer_names(qresnet.quantized(model), image_shape)`` or
  ``qinception.layer_names(model)`` (the keys of `grassq.quant.cost.layer_costs` too).

  `rebuild(folded)` returns full float variables with which ``model.apply(..., train=False)``
  computes the folded network with weights `folded` (other parameters fixed): kernels
  W = W_f * sqrt(var + eps) / gamma. A channel with gamma = 0 (e.g. zero-initialized residual
  BN) would not be invertible; there the BN is rewritten to the identity map plus beta
  (scale sqrt(var + eps), mean 0) and W = W_f, the same function. Layers missing from `folded`
  keep their weights. `rebuild` is pure jax (jit/grad/vmap-able).

  Args:
    model: a float `grassq.models.ResNet` or `InceptionV3` with a "linear" or "grassmann" head.
    variables: its variables {"params", "batch_stats"}.

  Returns:
    (folded, rebuild).

  Raises:
    TypeError: a QAT model, or not a grassq ResNet / InceptionV3.
    ValueError: a head without QAT twin, a conv without its BatchNorm, unknown layer names
      given to `rebuild`.
  """
  if isinstance(model, qat.QuantBits) or not isinstance(model, (ResNet, InceptionV3)):
    raise TypeError("folded_weights needs a float grassq.models.ResNet or InceptionV3, got "
                    f"{type(model).__name__}")
  if model.head not in ("linear", "grassmann"):
    raise ValueError(f"head {model.head!r} has no quantized twin; supported: linear, grassmann")
  order = _layer_order(model)
  params, stats = variables["params"], variables.get("batch_stats", {})
  convs = sorted(_conv_paths(params), key=lambda p: order("/".join(p)))
  if not convs:
    raise ValueError("no conv layers found in variables['params']")
  in_channels = _get(params, convs[0])["kernel"].shape[-2]
  eps = _bn_epsilons(model, variables, in_channels)

  specs = {}
  for path in convs:
    bn = path[:-1] + (path[-1].replace("conv", "bn"),)
    try:
      _ = (_get(params, bn)["scale"], _get(params, bn)["bias"], _get(stats, bn)["mean"],
           _get(stats, bn)["var"], eps[bn])
    except KeyError:
      raise ValueError(f"conv {'/'.join(path)} has no BatchNorm {'/'.join(bn)} (or its "
                       "statistics) after it") from None
    specs["/".join(path)] = (path, bn, eps[bn])
  n_weights = sum(1 for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
                  if p[-1].key in ("kernel", "bases"))
  if n_weights != len(specs) + 1:
    raise ValueError(f"params hold {n_weights} kernels/bases but {len(specs) + 1} conv+BN or "
                     "head layers were found: not the variables of this model?")
  folded = _fold(params, stats, tuple(specs.values()), model.head == "grassmann")
  specs["head"] = None

  def rebuild(new_folded):
    unknown = [k for k in new_folded if k not in specs]
    if unknown:
      raise ValueError(f"unknown layer name(s) {unknown}; known: {list(specs)}")
    p, s = qat.mutable_copy(params), qat.mutable_copy(stats)
    for name, wf in new_folded.items():
      if name == "head":
        if model.head == "grassmann":
          p["head"]["bases"] = _kernel_as_bases(wf, model.num_classes)
        else:
          p["head"]["dense"]["kernel"] = wf
        continue
      path, bn, e = specs[name]
      gamma, mean, var = _get(p, bn)["scale"], _get(s, bn)["mean"], _get(s, bn)["var"]
      std = jnp.sqrt(var + e)
      dead = gamma == 0
      safe_gamma = jnp.where(dead, jnp.ones_like(gamma), gamma)
      _get(p, path)["kernel"] = jnp.where(dead, wf, wf * (std / safe_gamma))
      _get(p, bn)["scale"] = jnp.where(dead, std, gamma)
      _get(s, bn)["mean"] = jnp.where(dead, jnp.zeros_like(mean), mean)
    return {**variables, "params": p, "batch_stats": s}

  return {name: folded[name] for name in sorted(folded, key=order)}, rebuild


@functools.partial(jax.jit, static_argnums=(2, 3))
def _fold(params, stats, convs, grassmann):
  """{layer: folded weight} for the (conv path, BN path, eps) triples in `convs`, and the head."""
  out = {}
  for path, bn, eps in convs:
    gamma, beta = _get(params, bn)["scale"], _get(params, bn)["bias"]
    mean, var = _get(stats, bn)["mean"], _get(stats, bn)["var"]
    out["/".join(path)] = qat.fold_bn(_get(params, path)["kernel"], gamma, beta, mean, var, eps)[0]
  head = params["head"]
  out["head"] = qat.bases_as_kernel(head["bases"]) if grassmann else head["dense"]["kernel"]
  return out


def _cross_entropy_loss(model, rebuild, spec):
  if isinstance(spec, str):
    from grassq import data as gdata
    spec = gdata.get_spec(spec)

  def loss_fn(folded, batch):
    if not isinstance(batch, Mapping) or "image" not in batch or "label" not in batch:
      raise KeyError("a batch must be a dict with 'image' and 'label' (and optionally 'mask'), "
                     "as grassq.data / grassq.train produce")
    images = batch["image"]
    if spec is not None:
      from grassq import data as gdata
      images = gdata.normalize(images, spec)
    elif not jnp.issubdtype(jnp.result_type(images), jnp.floating):
      raise TypeError(f"images of dtype {jnp.result_type(images)} need `spec` to be normalized")
    logits = model.apply(rebuild(folded), images, train=False)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, jnp.asarray(batch["label"])[:, None].astype(jnp.int32),
                               axis=-1)[:, 0]
    if "mask" in batch:
      w = jnp.asarray(batch["mask"]).astype(jnp.float32)
      return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)
    return jnp.mean(nll)

  return loss_fn


def folded_loss(model: ResNet | InceptionV3, variables: Mapping, spec=None) -> Callable:
  """Softmax cross-entropy of the eval-mode model as a function of its folded weights.

  Args:
    model, variables: as for `folded_weights`.
    spec: a `grassq.data.DatasetSpec` or dataset name: uint8 images are normalized with
      `grassq.data.normalize`; None: images are used as given (already normalized floats).

  Returns:
    loss_fn(folded, batch) -> scalar, for batches {"image", "label"[, "mask"]} as built by
    grassq.train from grassq.data's index batches (a mask averages over its True rows).
    No label smoothing: the plain cross-entropy of the logits.
  """
  _, rebuild = folded_weights(model, variables)
  return _cross_entropy_loss(model, rebuild, spec)


# ----------------------------------------------------------------------------- sensitivity


@functools.partial(jax.jit, static_argnums=1)
def _squared_quant_errors(folded, bits):
  return {name: jnp.stack([jnp.sum(jnp.square(
      quantizers.fake_quant_weight(w, b).astype(jnp.float32) - w.astype(jnp.float32)))
      for b in bits]) for name, w in folded.items()}


def sensitivity(traces: Mapping[str, TraceEstimate | float], folded: Mapping[str, jax.Array],
                bits: Sequence[int] = (4, 8), clip_negative: bool = False
                ) -> dict[str, dict[int, float]]:
  """HAWQV3 sensitivities Omega_l(b) = Tr(H_l)/n_l * ||Q_b(W_l) - W_l||^2.

  Q_b is `grassq.quant.fake_quant_weight` (symmetric, per output channel on the last axis), the
  quantizer of the QAT layers, applied to the folded weights. A negative trace (a non-convex
  layer) gives a negative Omega, which would tell the ILP that coarser weights *lower* the loss;
  it is returned as is unless `clip_negative`, which counts such a trace as 0 (insensitive).

  Args:
    traces: {layer: TraceEstimate, or a trace per parameter}; the layers to score.
    folded: {layer: folded weight} (as from `folded_weights`); may hold more layers.
    bits: bit-widths to score.
    clip_negative: count negative traces as 0.

  Returns:
    {layer: {bits: Omega}} as python floats, in the order of `traces`.

  Raises:
    ValueError: a layer of `traces` missing from `folded`, an unsupported bit-width.
  """
  if not isinstance(traces, Mapping) or not isinstance(folded, Mapping):
    raise TypeError("traces and folded must be dicts keyed by layer name")
  unknown = [name for name in traces if name not in folded]
  if unknown:
    raise ValueError(f"unknown layer name(s) {unknown}: not in folded ({list(folded)})")
  for b in bits:
    quantizers.qrange(b, True)  # raises on unsupported bit-widths
  bits = tuple(int(b) for b in bits)
  errors = jax.device_get(_squared_quant_errors({n: folded[n] for n in traces}, bits))
  out = {}
  for name, t in traces.items():
    per_param = t.trace_per_param if isinstance(t, TraceEstimate) else float(t)
    if clip_negative:
      per_param = max(per_param, 0.0)
    out[name] = {b: per_param * float(errors[name][i]) for i, b in enumerate(bits)}
  return out


def layer_sensitivities(model: ResNet | InceptionV3, variables: Mapping, batches: Iterable[Any],
                        key: jax.Array, bits: Sequence[int] = (4, 8), spec=None, **hutchinson_kwargs
                        ) -> tuple[dict[str, dict[int, float]], dict[str, TraceEstimate]]:
  """Folded weights -> Hutchinson traces of the eval-mode cross-entropy -> Omega per layer.

  Args:
    model, variables: a float grassq ResNet or InceptionV3 and its variables (see
      `folded_weights`).
    batches: batches {"image", "label"[, "mask"]} (see `folded_loss`).
    key: PRNG key of the probes.
    bits: bit-widths to score.
    spec: dataset spec or name to normalize uint8 images (see `folded_loss`).
    **hutchinson_kwargs: probes_per_step, tol, min_probes, max_probes.

  Returns:
    (sensitivity {layer: {bits: Omega}}, traces {layer: TraceEstimate}).
  """
  folded, rebuild = folded_weights(model, variables)
  loss_fn = _cross_entropy_loss(model, rebuild, spec)
  traces = hutchinson_trace(loss_fn, folded, batches, key, **hutchinson_kwargs)
  return sensitivity(traces, folded, bits), traces
