"""HAWQV3's bit allocation: an integer linear program over per-layer bit-widths.

Each free layer picks one bit-width from its candidates (a one-hot boolean vector); the program
minimises the total sensitivity Σ Ω_i(b_i) under any number of cost budgets at once:

    minimise    Σ_i Σ_b Ω_i(b) x_ib
    subject to  Σ_b x_ib = 1                       for every layer i
                Σ_i Σ_b cost_f,i(b) x_ib ≤ B_f     for every budget family f (size, BOPs, ...)
                bits(i) = bits(j)                  for every tied pair (i, j)

with pinned layers (the first conv and the classifier, at 8 bit) fixed and counted at their
pinned cost in every budget. HAWQV3's sensitivity is Ω_i(b) = Tr(H_i)/n_i · ||Q_b(W_i) − W_i||²;
any per-layer, per-bit number works. It is solved exactly by cvxpy's MILP interface to HiGHS
(relative and absolute optimality gaps 0), so the answer is the optimum, not a near one.

Cost tables (`cost_tables`) come from `grassq.quant.cost.layer_costs`: size in bits
(parameters × b; divide by 8·2^20 for MiB), BOPs = MACs × b_w × b_a with a layer's bits applying
to its weights and to the activations it reads (HAWQV3), and latency from a measured table
{layer: {bits: seconds}} or, without one, BOPs as a proxy. A budget is usually a fraction r of
the way from all-lowest to all-highest bits (`budget_from_fraction`; HAWQV3's low/medium/high
are r = 0.25/0.5/0.75, `BUDGET_FRACTIONS`).

A budget is met when the cost is at most the limit plus 1e-9 of the family's scale (float sums
taken in different orders differ in the last bits; r = 1 must allow all-highest).
"""

from __future__ import annotations

import math
import numbers
from typing import Mapping, Sequence

import cvxpy as cp
import numpy as np

from grassq.quant import cost as cost_lib
from grassq.quant import qat

BUDGET_FRACTIONS = {"low": 0.25, "medium": 0.5, "high": 0.75}  # HAWQV3's three budgets

_RTOL = 1e-9  # budget tolerance, relative to the family's scale


def allocate_bits(sensitivity: Mapping[str, Mapping[int, float]],
                  costs: Mapping[str, Mapping[str, Mapping[int, float]]],
                  budgets: Mapping[str, float],
                  ties: Sequence[tuple[str, str]] = (),
                  pinned: Mapping[str, int] | None = None) -> dict[str, int]:
  """Per-layer bit-widths of least total sensitivity within every budget (HAWQV3's ILP).

  Args:
    sensitivity: {layer: {bits: omega}} for the free layers; its keys are each layer's
      candidate bit-widths (e.g. {4, 8} or {2, 4, 8}). A pinned layer may be listed too.
    costs: {family: {layer: {bits: cost}}}, e.g. from `cost_tables`. Only the budgeted families
      are read; each must cover every candidate bit of every free layer and the pinned bits of
      every pinned layer, and name no other layer.
    budgets: {family: limit} for any subset of the cost families, all enforced at once.
    ties: pairs of layer names that must get the same bit-width (a block's conv1 and its
      projection shortcut, which read the same quantized input; see `tied_layers`).
    pinned: {layer: bits} of layers fixed at that bit-width; they count at that cost in every
      budget.

  Returns:
    {layer: bits} for every free and pinned layer, in the order of `sensitivity` then `pinned`.

  Raises:
    ValueError: on an unknown budget family, layers missing from (or unknown to) sensitivity or
      costs, candidate bits that the costs do not cover, ties naming unknown layers or with no
      common bit-width, pinned bits that are not a candidate, budgets that cannot be met (the
      message gives the least achievable cost per family), or a solver failure.
  """
  pinned = {name: _bit(b, f"pinned[{name!r}]") for name, b in (pinned or {}).items()}
  candidates = _candidates(sensitivity, pinned)
  layers = list(candidates)
  tables = _check_costs(costs, budgets, candidates, pinned)
  groups = _tie_groups(ties, candidates)

  # One decision per tie group over the group's common bit-widths.
  options, omega, group_cost = [], [], {f: [] for f in tables}
  for group in groups:
    bits = sorted(set.intersection(*(set(candidates[name]) for name in group)))
    if not bits:
      detail = ", ".join(f"{n}: {'pinned ' if n in pinned else ''}{candidates[n]}"
                         for n in group)
      raise ValueError(f"tied layers have no common bit-width ({detail})")
    options.append(bits)
    omega.append(np.array([sum(float(sensitivity[n][b]) for n in group if n in sensitivity)
                           for b in bits]))
    for f, table in tables.items():
      group_cost[f].append(np.array([sum(float(table[n][b]) for n in group) for b in bits]))

  # Budgets relative to the cheapest choice of every group: coefficients ≥ 0, fixed groups drop.
  rows, least = {}, {}
  for f in tables:
    least[f] = sum(c.min() for c in group_cost[f])
    extra = [c - c.min() for c in group_cost[f]]
    limit = float(budgets[f])
    scale = max(abs(limit), least[f] + sum(e.max() for e in extra), 1e-300)
    rows[f] = (extra, limit - least[f], _RTOL * scale)
  report = "; ".join(f"{f}: limit {budgets[f]:.10g}, least achievable {least[f]:.10g}"
                     for f in tables)
  if any(rhs < -tol for _, rhs, tol in rows.values()):
    raise ValueError(f"infeasible budget ({report})")

  free = [g for g, bits in enumerate(options) if len(bits) > 1]
  choice = {g: 0 for g in range(len(groups))}
  if free:
    choice.update(_solve(free, omega, rows, options, report))

  answer = {}
  for g, group in enumerate(groups):
    for name in group:
      answer[name] = options[g][choice[g]]
  for f, (extra, rhs, tol) in rows.items():  # never return a silent wrong answer
    used = sum(float(extra[g][choice[g]]) for g in range(len(groups)))
    if used > rhs + 2 * tol:
      raise ValueError(f"solver failure: its answer exceeds the {f} budget by {used - rhs:.6g}")
  return {name: answer[name] for name in layers}


def _solve(free, omega, rows, options, report):
  """Solves the MILP over the free groups; returns {group: index of the chosen option}."""
  sizes = [len(options[g]) for g in free]
  starts = np.cumsum([0] + sizes)
  n = int(starts[-1])
  x = cp.Variable(n, boolean=True)
  onehot = np.zeros((len(free), n))
  for k, (s, m) in enumerate(zip(starts, sizes)):
    onehot[k, s:s + m] = 1.0
  # Objective relative to each group's best option, scaled to at most 1 (numerics only).
  c = np.concatenate([omega[g] - omega[g].min() for g in free])
  c = c / max(c.max(), 1e-300)
  constraints = [onehot @ x == 1]
  for extra, rhs, tol in rows.values():
    if sum(extra[g].max() for g in free) <= rhs + tol:
      continue  # met by every choice
    a = np.concatenate([extra[g] for g in free])
    scale = max(rhs + tol, a.max())
    constraints.append((a / scale) @ x <= (rhs + tol) / scale)
  problem = cp.Problem(cp.Minimize(c @ x), constraints)
  try:
    problem.solve(solver=cp.HIGHS, mip_rel_gap=0.0, mip_abs_gap=0.0,
                  mip_feasibility_tolerance=1e-10, output_flag=False)
  except cp.error.SolverError as e:
    raise ValueError(f"solver failure: HiGHS raised {e}") from e
  if problem.status in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE):
    raise ValueError(f"infeasible budgets: each family can be met alone but not all at once "
                     f"({report})")
  if problem.status != cp.OPTIMAL or x.value is None:
    raise ValueError(f"solver failure: HiGHS status {problem.status!r}")
  value = np.asarray(x.value)
  choice = {}
  for k, g in enumerate(free):
    part = value[starts[k]:starts[k] + sizes[k]]
    if not (np.all(np.abs(part - np.round(part)) < 1e-6) and round(part.sum()) == 1):
      raise ValueError(f"solver failure: non-integral choice {part} for group {g}")
    choice[g] = int(np.argmax(part))
  return choice


def _bit(b, where):
  if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b <= 0:
    raise ValueError(f"{where}: bit-widths must be positive integers, got {b!r}")
  return int(b)


def _number(v, where):
  if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
    raise ValueError(f"{where} must be a finite number, got {v!r}")
  return float(v)


def _candidates(sensitivity, pinned):
  """{layer: sorted candidate bits}; a pinned layer's only candidate is its pinned bits."""
  candidates = {}
  for name, per_bit in sensitivity.items():
    if not per_bit:
      raise ValueError(f"sensitivity[{name!r}] has no candidate bit-widths")
    for b, v in per_bit.items():
      _bit(b, f"sensitivity[{name!r}]")
      _number(v, f"sensitivity[{name!r}][{b}]")
    candidates[name] = sorted(int(b) for b in per_bit)
  for name, b in pinned.items():
    if name in candidates and b not in candidates[name]:
      raise ValueError(f"pinned bits {b} of {name!r} are not among its candidate bit-widths "
                       f"{candidates[name]}")
    candidates[name] = [b]
  return candidates


def _check_costs(costs, budgets, candidates, pinned):
  """The budgeted cost tables, checked against the layers and their candidate bits."""
  tables = {}
  for f, limit in budgets.items():
    if f not in costs:
      raise ValueError(f"unknown budget family {f!r}; costs has: {', '.join(map(repr, costs))}")
    _number(limit, f"budgets[{f!r}]")
    table = costs[f]
    missing = [n for n in candidates if n not in table]
    if missing:
      raise ValueError(f"costs[{f!r}] has no entry for layers {missing}")
    unknown = [n for n in table if n not in candidates]
    if unknown:
      raise ValueError(f"costs[{f!r}] has layers with no sensitivity that are not pinned: "
                       f"{unknown} (pin them, or leave them out of the costs)")
    for name, bits in candidates.items():
      for b, v in table[name].items():
        _bit(b, f"costs[{f!r}][{name!r}]")
        _number(v, f"costs[{f!r}][{name!r}][{b}]")
      have = sorted(int(b) for b in table[name])
      if not set(bits) <= set(have):
        what = "pinned bits" if name in pinned else "candidate bits"
        raise ValueError(f"inconsistent candidate bits: {what} of {name!r} are {bits} but "
                         f"costs[{f!r}][{name!r}] has {have}")
    tables[f] = table
  return tables


def _tie_groups(ties, candidates):
  """Layers joined by ties (union-find), each group in the order of `candidates`."""
  parent = {name: name for name in candidates}

  def root(n):
    while parent[n] != n:
      parent[n] = parent[parent[n]]
      n = parent[n]
    return n

  for pair in ties:
    if isinstance(pair, str) or len(pair) != 2:
      raise ValueError(f"a tie is a pair of layer names, got {pair!r}")
    for name in pair:
      if name not in candidates:
        raise ValueError(f"tie {tuple(pair)} names unknown layer {name!r} (neither in "
                         "sensitivity nor pinned)")
    a, b = root(pair[0]), root(pair[1])
    if a != b:
      parent[b] = a
  groups = {}
  for name in candidates:
    groups.setdefault(root(name), []).append(name)
  return list(groups.values())


def budget_from_fraction(costs_family: Mapping[str, Mapping[int, float]], r: float | str,
                         pinned: Mapping[str, int] | None = None,
                         bits: Sequence[int] | None = None) -> float:
  """HAWQV3's budget: low + r · (high − low) over the free layers, plus the pinned layers' cost.

  Args:
    costs_family: one family's table {layer: {bits: cost}}, e.g. ``cost_tables(...)["size"]``.
    r: fraction in [0, 1] of the way from all-lowest to all-highest bits, or a name of
      `BUDGET_FRACTIONS` ("low" 0.25, "medium" 0.5, "high" 0.75).
    pinned: {layer: bits} of pinned layers, counted at that cost.
    bits: the lowest and highest bit-widths to span, e.g. (4, 8) (their min and max are used);
      default: each layer's lowest and highest in the table.

  Returns:
    The absolute limit, to pass in `allocate_bits`'s budgets.

  Raises:
    ValueError: on an unknown name or r outside [0, 1], or bits missing from the table.
  """
  if isinstance(r, str):
    if r not in BUDGET_FRACTIONS:
      raise ValueError(f"unknown budget {r!r}; available: {', '.join(BUDGET_FRACTIONS)}")
    r = BUDGET_FRACTIONS[r]
  r = _number(r, "fraction r")
  if not 0.0 <= r <= 1.0:
    raise ValueError(f"fraction r must lie in [0, 1], got {r}")
  pinned = dict(pinned or {})
  for name in pinned:
    if name not in costs_family:
      raise ValueError(f"pinned layer {name!r} is not in the cost table")
  low = high = fixed = 0.0
  for name, table in costs_family.items():
    have = {_bit(b, f"cost table of {name!r}"): _number(v, f"cost of {name!r} at {b} bits")
            for b, v in table.items()}
    if name in pinned:
      want = [pinned[name]]
    elif bits is None:
      want = [min(have), max(have)]
    else:
      want = [min(bits), max(bits)]
    gone = [b for b in want if b not in have]
    if gone:
      raise ValueError(f"cost table of {name!r} has bits {sorted(have)}, not {gone}")
    if name in pinned:
      fixed += have[want[0]]
    else:
      low, high = low + have[want[0]], high + have[want[1]]
  return low + r * (high - low) + fixed


def cost_tables(model, image_shape: Sequence[int], bits: Sequence[int] = (4, 8),
                latency: Mapping[str, Mapping[int, float]] | None = None) -> dict:
  """Per-layer, per-bit cost tables of a grassq model for `allocate_bits`.

  Args:
    model: a grassq `ResNet` or `InceptionV3`, or its QAT twin (the same layers).
    image_shape: input shape without the batch, e.g. (28, 28, 1).
    bits: the bit-widths to tabulate.
    latency: measured {layer: {bits: seconds}} for every layer and bit-width (HAWQV3's T4
      tables, or timings of a deployed module); default: BOPs as a proxy.

  Returns:
    {"size": {layer: {b: params · b}} in bits, "bops": {layer: {b: MACs · b · b}},
    "latency": {layer: {b: seconds or BOPs}}}, layers as in `grassq.quant.cost.layer_costs`.

  Raises:
    ValueError: if the latency table misses or adds a layer or a bit-width.
  """
  bits = [_bit(b, "cost_tables bits") for b in bits]
  layers = cost_lib.layer_costs(qat.float_twin(model), image_shape)
  size = {n: {b: c["params"] * b for b in bits} for n, c in layers.items()}
  bops = {n: {b: c["macs"] * b * b for b in bits} for n, c in layers.items()}
  if latency is None:
    timed = {n: dict(t) for n, t in bops.items()}
  else:
    missing = [n for n in layers if n not in latency]
    unknown = [n for n in latency if n not in layers]
    if missing or unknown:
      raise ValueError(f"latency table does not match the model's layers: missing {missing}, "
                       f"unknown {unknown}")
    timed = {}
    for n in layers:
      gone = [b for b in bits if b not in latency[n]]
      if gone:
        raise ValueError(f"latency table of {n!r} has no entry for bits {gone}")
      timed[n] = {b: _number(latency[n][b], f"latency[{n!r}][{b}]") for b in bits}
  return {"size": size, "bops": bops, "latency": timed}


def tied_layers(model, image_shape: Sequence[int]) -> list[tuple[str, str]]:
  """Pairs that must share a bit-width: each block's ``conv1`` and its ``proj_conv``; for
  InceptionV3 the convs of all branches that read one quantizer (`qinception.tied_layers`).

  Both read the block's quantized input ``act_in`` (quantized at conv1's bits), so with a
  layer's bits applying to its weights and the activations it reads they cannot differ.
  """
  from grassq.models.inception import InceptionV3
  from grassq.quant import qinception

  if isinstance(model, InceptionV3):  # and QInception: branches sharing one quantizer
    return qinception.tied_layers(model)
  names = cost_lib.layer_costs(qat.float_twin(model), image_shape)
  pairs = []
  for name in names:
    block, _, leaf = name.rpartition("/")
    if leaf == "proj_conv":
      if f"{block}/conv1" not in names:
        raise ValueError(f"{name} has no {block}/conv1 to tie it to")
      pairs.append((f"{block}/conv1", name))
  return sorted(pairs)
