"""The bit-allocation ILP: HAWQV3's nine published ResNet18 answers, brute-force optimality,
budgets, pinned layers, ties, clear errors, and cost tables from grassq models."""

import itertools
import json
import pathlib

import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest

from grassq.mixed import ilp
from grassq.models import create_model
from grassq.quant import cost, qresnet

ROOT = pathlib.Path(__file__).resolve().parents[1]
ANCHOR = ROOT / "tests" / "data" / "hawq_ilp_resnet18.json"
SHARED_ANCHORS = ROOT.parent / "shared" / "anchors"
SETTINGS = hypothesis.settings(max_examples=100, deadline=None)


# --- HAWQV3's published ResNet18 ILP ---------------------------------------------------------

@pytest.fixture(scope="module")
def hawq():
  """The published inputs in allocate_bits's terms (the anchor README's formulation)."""
  d = json.loads(ANCHOR.read_text())
  names = d["layers"]
  trace, d4, d8 = (np.array(d[k]) for k in (
      "Hutchinson_trace", "delta_weights_4bit_square", "delta_weights_8bit_square"))
  omega = {n: {4: t * a, 8: t * b} for n, t, a, b in zip(names, trace, d4, d8)}
  costs = {
      "modelsize": {n: {4: p * 4, 8: p * 8} for n, p in zip(names, d["parameters"])},
      "bops": {n: {4: m / 64, 8: m / 16} for n, m in zip(names, d["bops"])},  # MACs·b·b/32²
      "latency": {n: {4: a, 8: b} for n, a, b in zip(names, d["latency_int4"],
                                                     d["latency_int8"])},
  }
  ties = [(names[a], names[b]) for a, b in d["tied_pairs"]]
  return d, omega, costs, ties


def test_anchor_copy_matches_the_shared_anchors():
  if not SHARED_ANCHORS.is_dir():
    pytest.skip(f"{SHARED_ANCHORS} is absent (a clean clone); the test data copy is used alone")
  shared = SHARED_ANCHORS / "hawq_ilp_resnet18.json"
  assert json.loads(shared.read_text()) == json.loads(ANCHOR.read_text())


@pytest.mark.parametrize("form", ["omega_b", "difference"])
def test_reproduces_the_nine_published_resnet18_configs(hawq, form):
  d, omega, costs, ties = hawq
  names = d["layers"]
  if form == "difference":  # the notebook's objective Σ trace·(δ8 − δ4)·y: same optimum
    omega = {n: {4: 0.0, 8: w[8] - w[4]} for n, w in omega.items()}
  configs = d["published_bit_configs"]
  assert len(configs) == 9
  for key, published in configs.items():
    family, r = key.rsplit("_", 1)
    limit = ilp.budget_from_fraction(costs[family], float(r))
    got = ilp.allocate_bits(omega, costs, {family: limit}, ties)
    assert [got[n] for n in names] == published, key
    assert sum(costs[family][n][b] for n, b in got.items()) <= limit


def test_published_configs_need_the_ties(hawq):
  """Without the tied pairs the ILP finds other answers: the reproduction test can fail."""
  d, omega, costs, _ = hawq
  names, wrong = d["layers"], []
  for key, published in d["published_bit_configs"].items():
    family, r = key.rsplit("_", 1)
    got = ilp.allocate_bits(omega, costs, {family: ilp.budget_from_fraction(costs[family],
                                                                            float(r))})
    wrong += [key] if [got[n] for n in names] != published else []
  assert wrong == ["bops_0.25", "bops_0.5", "latency_0.25", "latency_0.5"]


def test_published_configs_under_all_three_budgets_at_once(hawq):
  """Each published answer meets its own budget; asked for all three, the ILP stays optimal."""
  d, omega, costs, ties = hawq
  budgets = {f: ilp.budget_from_fraction(costs[f], "medium") for f in costs}
  got = ilp.allocate_bits(omega, costs, budgets, ties)
  for f, limit in budgets.items():
    assert sum(costs[f][n][b] for n, b in got.items()) <= limit
  # no single-family answer that meets all three budgets is better
  best = sum(omega[n][b] for n, b in got.items())
  for key, published in d["published_bit_configs"].items():
    bits = dict(zip(d["layers"], published))
    if all(sum(costs[f][n][b] for n, b in bits.items()) <= budgets[f] for f in budgets):
      assert best <= sum(omega[n][b] for n, b in bits.items()) + 1e-12, key


# --- optimality against brute force ----------------------------------------------------------

FAMILIES = ("size", "bops", "latency")


@st.composite
def instances(draw):
  """Small random problems: {4,8} or {2,4,8}, per-layer candidate subsets, pinned layers (in
  the costs only), ties, integer omegas and costs (no near-ties), 1-3 budgets at once."""
  bit_set = draw(st.sampled_from([(4, 8), (2, 4, 8)]))
  n = draw(st.integers(1, 6))
  free = [f"l{i}" for i in range(n)]
  pins = {f"p{i}": draw(st.sampled_from(bit_set)) for i in range(draw(st.integers(0, 2)))}
  some = st.lists(st.sampled_from(bit_set), min_size=1, max_size=3, unique=True)
  cand = {name: sorted(draw(st.one_of(st.just(list(bit_set)), some))) for name in free}
  names = free + list(pins)
  ties = draw(st.lists(st.tuples(st.sampled_from(names), st.sampled_from(names)), max_size=3))
  budgeted = draw(st.lists(st.sampled_from(FAMILIES), min_size=1, max_size=3, unique=True))
  # numbers from a seeded generator: uniform, where hypothesis would favour 0 and the ends
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  omega = {name: {b: int(rng.integers(0, 1001)) for b in cand[name]} for name in free}
  costs = {f: {name: {b: int(rng.integers(0, 101)) for b in cand.get(name, bit_set)}
               for name in names} for f in FAMILIES}
  budgets = {}
  for f in budgeted:
    fixed = sum(costs[f][name][b] for name, b in pins.items())
    lo = fixed + sum(min(costs[f][name].values()) for name in free)
    hi = fixed + sum(max(costs[f][name].values()) for name in free)
    if rng.random() < 0.5:
      budgets[f] = int(rng.integers(lo - 2, hi + 1))
    else:  # exactly the cost of some choice: optima on the limit (≤, not <)
      bits = {name: int(rng.choice(cand[name])) for name in free}
      budgets[f] = fixed + sum(costs[f][name][b] for name, b in bits.items())
  return omega, costs, budgets, ties, pins


def brute_force(omega, costs, budgets, ties, pins):
  """(least objective, feasible exists, tie-consistent exists) by enumerating every choice."""
  names = list(omega) + list(pins)
  options = [sorted(omega[n]) if n in omega else [pins[n]] for n in names]
  best, consistent = None, False
  for combo in itertools.product(*options):
    bits = dict(zip(names, combo))
    if any(bits[a] != bits[b] for a, b in ties):
      continue
    consistent = True
    if any(sum(costs[f][n][bits[n]] for n in names) > limit for f, limit in budgets.items()):
      continue
    value = sum(omega[n][bits[n]] for n in omega)
    best = value if best is None else min(best, value)
  return best, consistent


@SETTINGS
@hypothesis.given(instances())
def test_ilp_optimum_equals_brute_force(problem):
  omega, costs, budgets, ties, pins = problem
  best, consistent = brute_force(*problem)
  if not consistent:
    with pytest.raises(ValueError, match="no common bit-width"):
      ilp.allocate_bits(omega, costs, budgets, ties, pins)
    return
  if best is None:
    with pytest.raises(ValueError, match="infeasible") as e:
      ilp.allocate_bits(omega, costs, budgets, ties, pins)
    assert "least achievable" in str(e.value)
    return
  got = ilp.allocate_bits(omega, costs, budgets, ties, pins)
  assert list(got) == list(omega) + list(pins)
  assert all(got[n] in omega[n] for n in omega)
  assert all(got[n] == b for n, b in pins.items())
  assert all(got[a] == got[b] for a, b in ties)
  for f, limit in budgets.items():
    assert sum(costs[f][n][b] for n, b in got.items()) <= limit
  assert sum(omega[n][got[n]] for n in omega) == best
  assert ilp.allocate_bits(omega, costs, budgets, ties, pins) == got  # deterministic


# --- budgets, fractions, pinned layers --------------------------------------------------------

@st.composite
def monotone_instances(draw):
  """Costs grow with bits and sensitivities favour high bits (Ω falls with bits)."""
  bit_set = draw(st.sampled_from([(4, 8), (2, 4, 8)]))
  n = draw(st.integers(1, 8))
  names = [f"l{i}" for i in range(n)]
  pos = st.floats(0.01, 100.0)
  omega, table = {}, {}
  for name in names:
    w, c = draw(pos), draw(pos)
    omega[name] = {b: w * 2.0**-b for b in bit_set}
    table[name] = {b: c * b for b in bit_set}
  table["first"] = {b: draw(pos) * b for b in bit_set}
  ties = [(names[0], names[-1])]
  return omega, table, ties, bit_set


@SETTINGS
@hypothesis.given(monotone_instances(), st.floats(0.0, 1.0))
def test_fraction_budgets(problem, r):
  omega, table, ties, bit_set = problem
  pinned = {"first": 8}
  costs = {"size": table}
  run = lambda r: ilp.allocate_bits(omega, costs, {"size": ilp.budget_from_fraction(
      table, r, pinned)}, ties, pinned)
  assert run(1.0) == {**{n: max(bit_set) for n in omega}, "first": 8}
  assert run(0.0) == {**{n: min(bit_set) for n in omega}, "first": 8}
  got, limit = run(r), ilp.budget_from_fraction(table, r, pinned)
  assert got["first"] == 8 and sum(table[n][b] for n, b in got.items()) <= limit * (1 + 1e-12)
  # the span (4, 8) of a {2, 4, 8} table: r = 0 is all 4-bit when 2 bits are not candidates
  if bit_set == (2, 4, 8):
    omega48 = {n: {4: w[4], 8: w[8]} for n, w in omega.items()}
    limit = ilp.budget_from_fraction(table, 0.0, pinned, bits=(4, 8))
    assert ilp.allocate_bits(omega48, costs, {"size": limit}, ties, pinned) == {
        **{n: 4 for n in omega}, "first": 8}


def test_named_fractions_are_hawqv3s():
  table = {"a": {4: 10.0, 8: 20.0}, "b": {4: 1.0, 8: 2.0}, "p": {4: 5.0, 8: 7.0}}
  assert ilp.BUDGET_FRACTIONS == {"low": 0.25, "medium": 0.5, "high": 0.75}
  assert ilp.budget_from_fraction(table, "medium", {"p": 8}) == 11 + 0.5 * 11 + 7
  assert ilp.budget_from_fraction(table, 0.25, bits=(4, 8)) == 16 + 0.25 * 13
  with pytest.raises(ValueError, match="unknown budget 'mid'"):
    ilp.budget_from_fraction(table, "mid")
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    ilp.budget_from_fraction(table, 1.5)
  with pytest.raises(ValueError, match="not \\[2\\]"):
    ilp.budget_from_fraction(table, 0.5, bits=(2, 8))
  with pytest.raises(ValueError, match="pinned layer 'q'"):
    ilp.budget_from_fraction(table, 0.5, {"q": 8})


def test_pinned_layers_stay_pinned_and_count_in_every_budget():
  omega = {"a": {4: 5.0, 8: 0.0}, "b": {4: 1.0, 8: 0.0}, "first": {4: 0.0, 8: 100.0}}
  costs = {"size": {"a": {4: 4, 8: 8}, "b": {4: 4, 8: 8}, "first": {4: 40, 8: 80}},
           "bops": {"a": {4: 16, 8: 64}, "b": {4: 16, 8: 64}, "first": {4: 0, 8: 0}}}
  pinned = {"first": 8}
  # the pinned layer prefers 4 bit, and at 4 bit everything would fit: it stays at 8
  got = ilp.allocate_bits(omega, costs, {"size": 92, "bops": 1000}, pinned=pinned)
  assert got == {"a": 8, "b": 4, "first": 8}
  # its 80 bits count: at 91 no free layer can move to 8 bit, and 87 is below the least
  assert ilp.allocate_bits(omega, costs, {"size": 91}, pinned=pinned) == {
      "a": 4, "b": 4, "first": 8}
  with pytest.raises(ValueError, match=r"size: limit 87, least achievable 88"):
    ilp.allocate_bits(omega, costs, {"size": 87}, pinned=pinned)


def test_jointly_infeasible_budgets_raise():
  omega = {"a": {4: 1.0, 8: 0.0}, "b": {4: 1.0, 8: 0.0}}
  costs = {"size": {"a": {4: 1, 8: 2}, "b": {4: 1, 8: 2}},
           "bops": {"a": {4: 1, 8: 0}, "b": {4: 1, 8: 0}}}
  # size 2 needs both at 4 bit, bops 1 at least one at 8: only a split meets both, ties forbid it
  with pytest.raises(ValueError, match="not all at once"):
    ilp.allocate_bits(omega, costs, {"size": 2, "bops": 1}, ties=[("a", "b")])
  assert ilp.allocate_bits(omega, costs, {"size": 3, "bops": 1}) in (
      {"a": 4, "b": 8}, {"a": 8, "b": 4})


# --- errors ---------------------------------------------------------------------------------

def _base():
  omega = {"a": {4: 1.0, 8: 0.5}, "b": {4: 2.0, 8: 0.1}}
  costs = {"size": {"a": {4: 4, 8: 8}, "b": {4: 4, 8: 8}}}
  return omega, costs, {"size": 12}


@pytest.mark.parametrize("change, message", [
    (lambda o, c, b, k: b.update(energy=1.0), "unknown budget family 'energy'"),
    (lambda o, c, b, k: c["size"].pop("b"), r"costs\['size'\] has no entry for layers \['b'\]"),
    (lambda o, c, b, k: o.pop("b"), r"no sensitivity that are not pinned: \['b'\]"),
    (lambda o, c, b, k: o["a"].update({2: 3.0}), "inconsistent candidate bits"),
    (lambda o, c, b, k: o["a"].clear(), "no candidate bit-widths"),
    (lambda o, c, b, k: k.update(ties=[("a", "z")]), "unknown layer 'z'"),
    (lambda o, c, b, k: k.update(ties=["ab"]), "pair of layer names"),
    (lambda o, c, b, k: (o["a"].pop(8), c["size"]["a"].pop(8), k.update(ties=[("a", "b")]),
                         k.update(pinned={"b": 8})), "no common bit-width"),
    (lambda o, c, b, k: k.update(pinned={"a": 2}), "pinned bits 2 of 'a'"),
    (lambda o, c, b, k: b.update(size=float("nan")), "finite number"),
    (lambda o, c, b, k: o["a"].update({"4": 1.0}), "positive integers"),
    (lambda o, c, b, k: b.update(size=7), r"infeasible budget \(size: limit 7, least achievable 8"),
])
def test_clear_errors(change, message):
  omega, costs, budgets = _base()
  kw = {}
  change(omega, costs, budgets, kw)
  with pytest.raises(ValueError, match=message):
    ilp.allocate_bits(omega, costs, budgets, **kw)


def test_unbudgeted_families_are_not_read():
  omega, costs, budgets = _base()
  costs["latency"] = {"a": {4: 1.0}}  # incomplete, but no latency budget
  assert ilp.allocate_bits(omega, costs, budgets) == {"a": 4, "b": 8}


# --- cost tables from grassq models -----------------------------------------------------------

@pytest.fixture(scope="module")
def resnet20():
  m = create_model("resnet20", 10)
  return m, cost.layer_costs(m, (28, 28, 1)), ilp.cost_tables(m, (28, 28, 1))


def test_cost_tables_agree_with_grassq_quant_cost(resnet20):
  m, c, tables = resnet20
  assert set(tables) == {"size", "bops", "latency"}
  assert sorted(tables["bops"]) == sorted(qresnet.layer_names(qresnet.quantized(m),
                                                               (28, 28, 1)))
  for b in (4, 8):
    assert sum(t[b] for t in tables["bops"].values()) == cost.bops(c, b)
    assert sum(t[b] for t in tables["size"].values()) / 8 / cost.MIB == pytest.approx(
        cost.model_size_mib(c, b, sum(v["params"] for v in c.values())))
  assert tables["latency"] == tables["bops"]  # the BOPs proxy
  rng = np.random.default_rng()
  bits = {n: int(rng.choice([4, 8])) for n in c}
  assert sum(tables["bops"][n][b] for n, b in bits.items()) == cost.bops(c, bits)
  # the QAT twin has the same layers and costs
  assert ilp.cost_tables(qresnet.quantized(m), (28, 28, 1)) == tables


def test_tied_layers_and_an_allocation_for_resnet20(resnet20):
  m, c, tables = resnet20
  ties = ilp.tied_layers(m, (28, 28, 1))
  assert ties == [("stage2_block0/conv1", "stage2_block0/proj_conv"),
                  ("stage3_block0/conv1", "stage3_block0/proj_conv")]
  assert ilp.tied_layers(qresnet.quantized(m), (28, 28, 1)) == ties
  pinned = {n: 8 for n in qresnet.PINNED_8BIT if n in c}
  assert pinned == {"stem_conv": 8, "head": 8}
  rng = np.random.default_rng()
  omega = {}
  for n in c:
    if n not in pinned:
      w = rng.uniform(0.1, 1.0)
      omega[n] = {4: w, 8: w / 256}
  budgets = {"size": ilp.budget_from_fraction(tables["size"], "medium", pinned),
             "bops": ilp.budget_from_fraction(tables["bops"], "high", pinned)}
  bits = ilp.allocate_bits(omega, tables, budgets, ties, pinned)
  assert sorted(bits) == sorted(c) and bits["stem_conv"] == bits["head"] == 8
  assert all(bits[a] == bits[b] for a, b in ties)
  assert 4 in bits.values() and 8 in bits.values()
  assert cost.bops(c, bits) <= budgets["bops"]
  assert sum(tables["size"][n][b] for n, b in bits.items()) <= budgets["size"]


def test_measured_latency_table(resnet20):
  m, c, _ = resnet20
  latency = {n: {4: 1e-4, 8: 2e-4} for n in c}
  tables = ilp.cost_tables(m, (28, 28, 1), latency=latency)
  assert tables["latency"] == latency
  del latency["head"]
  with pytest.raises(ValueError, match=r"missing \['head'\]"):
    ilp.cost_tables(m, (28, 28, 1), latency=latency)
  with pytest.raises(ValueError, match=r"no entry for bits \[2\]"):
    ilp.cost_tables(m, (28, 28, 1), bits=(2, 4, 8), latency={n: {4: 1.0, 8: 2.0} for n in c})


def test_grassq_resnet18_tables_give_the_published_answers(hawq):
  """model → cost_tables / tied_layers → allocate_bits: the published inputs and size/BOPs answers
  (grassq's BOPs are MACs·b·b, HAWQV3's /32²; pinned layers add a constant: same answers)."""
  d, omega, _, _ = hawq
  m = create_model("resnet18", 1000)
  names = [n for n in qresnet.layer_names(qresnet.quantized(m), (224, 224, 3))
           if n not in qresnet.PINNED_8BIT]
  tables = ilp.cost_tables(m, (224, 224, 3))
  assert [tables["size"][n][4] for n in names] == [round(p * 2**20) * 4 for p in d["parameters"]]
  assert [tables["bops"][n][4] for n in names] == [round(b * 1e6) * 16 for b in d["bops"]]
  ties = ilp.tied_layers(m, (224, 224, 3))
  assert ties == [(names[a], names[b]) for a, b in d["tied_pairs"]]
  omega = {n: omega[hawq_name] for n, hawq_name in zip(names, d["layers"])}
  pinned = {"stem_conv": 8, "head": 8}
  for key, published in d["published_bit_configs"].items():
    family, r = key.rsplit("_", 1)
    family = {"modelsize": "size", "bops": "bops"}.get(family)
    if family is None:
      continue  # the T4 latency table has no entries for the pinned layers
    limit = ilp.budget_from_fraction(tables[family], float(r), pinned)
    got = ilp.allocate_bits(omega, {family: tables[family]}, {family: limit}, ties, pinned)
    assert [got[n] for n in names] == published, key


@pytest.fixture(scope="module")
def resnet50():
  m = create_model("resnet50", 1000)
  tables = ilp.cost_tables(m, (224, 224, 3))
  pinned = {n: 8 for n in qresnet.PINNED_8BIT if n in tables["size"]}
  return m, tables, pinned, ilp.tied_layers(m, (224, 224, 3))


def _objective(omega, bits):
  return sum(omega[n][b] for n, b in bits.items() if n in omega)


def test_larger_budgets_never_give_worse_objectives(resnet50):
  _, tables, pinned, ties = resnet50
  rng = np.random.default_rng()
  omega = {}
  for n in tables["size"]:
    if n not in pinned:
      w = rng.lognormal(0.0, 2.0)
      omega[n] = {4: w, 8: w * rng.uniform(0.0, 0.01)}
  previous = None
  for r in np.linspace(0.0, 1.0, 6):
    budgets = {f: ilp.budget_from_fraction(tables[f], float(r), pinned) for f in ("size", "bops")}
    bits = ilp.allocate_bits(omega, tables, budgets, ties, pinned)
    value = _objective(omega, bits)
    if previous is not None:
      assert value <= previous + 1e-12 * abs(previous)
    previous = value
    free = [bits[n] for n in omega]
    if r == 0.0:
      assert set(free) == {4}
    if r == 1.0:
      assert set(free) == {8}


def test_resnet50_sized_problem_solves_in_under_a_second(resnet50):
  import time

  _, tables, pinned, ties = resnet50
  free = [n for n in tables["size"] if n not in pinned]
  assert len(tables["size"]) == 54 and len(free) == 52  # 53 convs + the classifier, 2 pinned
  rng = np.random.default_rng()
  omega = {n: {4: w, 8: w / 300} for n, w in zip(free, rng.lognormal(0.0, 2.0, len(free)))}
  budgets = {f: ilp.budget_from_fraction(tables[f], "medium", pinned)
             for f in ("size", "bops", "latency")}
  ilp.allocate_bits(omega, tables, budgets, ties, pinned)  # warm up cvxpy's imports and caches
  t = time.perf_counter()
  bits = ilp.allocate_bits(omega, tables, budgets, ties, pinned)
  elapsed = time.perf_counter() - t
  assert elapsed < 1.0, elapsed
  for f, limit in budgets.items():
    assert sum(tables[f][n][b] for n, b in bits.items()) <= limit * (1 + 1e-9)


def test_inception_branches_reading_one_quantizer_are_tied():
  from grassq.quant import qinception
  m = create_model("inception_v3_small", 10)
  ties = ilp.tied_layers(m, (28, 28, 1))
  assert ties and ties == ilp.tied_layers(qinception.quantized(m), (28, 28, 1))
  tables = ilp.cost_tables(qinception.quantized(m), (28, 28, 1))
  assert tables == ilp.cost_tables(m, (28, 28, 1)) and len(tables["bops"]) > 20
  names = set(tables["bops"])
  assert all(a in names and b in names for a, b in ties)
  pinned = {n: 8 for n in qinception.PINNED_8BIT if n in names}
  rng = np.random.default_rng()
  omega = {n: {4: float(rng.uniform()), 8: 0.0} for n in names if n not in pinned}
  budget = {"bops": ilp.budget_from_fraction(tables["bops"], "medium", pinned)}
  bits = ilp.allocate_bits(omega, tables, budget, ties, pinned)
  assert all(bits[a] == bits[b] for a, b in ties)
