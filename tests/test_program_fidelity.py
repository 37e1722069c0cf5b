"""The integer program computes what its QAT model computes, and proves its int32 bounds.

Issue 15, items 10-12 and 8: random small QAT ResNets (every stem and block kind, both
shortcuts, signed and unsigned activations, both heads, odd image sizes) are held against the
fake-quant model they came from, op by op with teacher forcing (`program.layer_report(...,
local=True)`), and the back ends (interpreter, TVM, ONNX) against each other on the clamps the
program records (``relu``, ``proj_max``); `program.value_bounds` is checked for soundness (every
interpreter value inside its bounds) and for refusing what could overflow.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grassq.models import create_model
from grassq.quant import intops, qresnet, requantize, requantize_reference
from grassq.quant import program as P

I32_MAX = 2**31 - 1

# Random small QAT ResNets: (model fields, hawq_signed8, Grassmann subspace_dim or None for the
# linear head, image). Together: stems cifar/imagenet/deep, basic and bottleneck blocks (stride
# on the 1x1 and on the 3x3), conv and avgpool shortcuts, signed and unsigned 8-bit
# activations, linear and Grassmann heads (odd k, on signed and unsigned features), odd sizes.
CASES = {
    "cifar-basic-conv-signed-linear": (
        dict(block="basic", stem="cifar", shortcut="conv", stage_sizes=(1, 1), num_filters=8),
        True, None, (9, 11, 1)),
    "imagenet-bottleneck1x1-conv-unsigned-gcr3": (
        dict(block="bottleneck", stem="imagenet", stride_on="1x1", shortcut="conv",
             stage_sizes=(1, 1), num_filters=4), False, 3, (13, 13, 1)),
    "deep-bottleneck3x3-avgpool-signed-gcr1": (
        dict(block="bottleneck", stem="deep", shortcut="avgpool", stage_sizes=(1, 1),
             num_filters=4), True, 1, (13, 13, 1)),
    "deep-basic-avgpool-unsigned-linear": (
        dict(block="basic", stem="deep", shortcut="avgpool", stage_sizes=(1, 1), num_filters=8),
        False, None, (11, 9, 1)),
}
SIGNED = "cifar-basic-conv-signed-linear"


def calibrate(fields, signed, k, image, num_classes=5, seed=0, head_kwargs=None):
  """A QAT ResNet and its variables after one training batch of 16 random images."""
  kw = dict(fields)
  if k:
    kw.update(head="grassmann", head_kwargs=dict(head_kwargs or {}, subspace_dim=k))
  model = create_model("resnet20", num_classes, zero_init_residual=False, **kw)
  q = qresnet.quantized(model, fix_bn=True, hawq_signed8=signed)
  x = jax.random.normal(jax.random.key(seed), (16, *image))
  qv = jax.jit(q.init)(jax.random.key(seed + 1), x[:1])
  _, upd = jax.jit(lambda v, x: q.apply(v, x, train=True, mutable=["batch_stats"]))(qv, x)
  return q, {**qv, "batch_stats": upd["batch_stats"]}


@functools.lru_cache(maxsize=None)
def case(name):
  """(model, variables, program) of one of `CASES`, built once per test session."""
  fields, signed, k, image = CASES[name]
  q, qv = calibrate(fields, signed, k, image)
  return q, qv, P.to_program(q, qv, image)


def random_images(image, n=200, seed=9):
  return np.asarray(jax.random.normal(jax.random.key(seed), (n, *image)))


def pool_floor_bound(prog, add_name):
  """LSBs (of the join) by which a ResNet-D block's join may differ from the model's with
  teacher forcing: the model averages its shortcut in float, the program floors the integer
  average (`avg_pool`), less than 1 input LSB per pooled value; through the projection that is
  below Σ|w| accumulator LSBs per channel, times the shortcut's requantization ratio, plus one
  LSB of rounding per branch."""
  block = add_name.rsplit("/", 1)[0]
  conv = prog.layer(f"{block}/proj_conv")
  assert conv.attrs["w_bits"] == 8
  w = np.abs(conv.arrays["weight"].astype(np.int64)).reshape(-1, conv.attrs["cout"]).sum(0)
  rq = prog.layer(f"{block}/add_shortcut")
  ratio = rq.arrays["multiplier"].astype(np.float64) * 2.0**-rq.arrays["shift"]
  return int(np.ceil((w * ratio).max())) + 2


def relu_ops(prog):
  return {op.name for op in prog.ops if op.kind == "requantize" and op.attrs.get("relu")}


@pytest.mark.parametrize("name", list(CASES))
def test_program_holds_its_qat_model(name):
  """Per op at most 1 LSB with teacher-forced inputs, top-1 agreement >= 0.98 on 200 random
  images. Documented exception: the residual join of a block with ResNet-D's avg-pool
  shortcut, where `qresnet` averages in float and the program floors (bounded by
  `pool_floor_bound`, a few 8-bit LSBs)."""
  q, qv, prog = case(name)
  fields, signed, k, image = CASES[name]
  rep = P.layer_report(prog, q, qv, random_images(image), local=True)
  assert rep["top1_agreement"] >= 0.98, rep["top1_agreement"]
  for layer, r in rep["local_layers"].items():
    pooled = (fields["shortcut"] == "avgpool" and layer.endswith("/add")
              and any(op.name == layer.replace("/add", "/proj_pool") for op in prog.ops))
    bound = pool_floor_bound(prog, layer) if pooled else 1
    assert r["max_lsb"] <= bound, (layer, r, bound)
  # every ReLU of the model is recorded at its quantizer
  expect = {"stem_act"} | {f"stem_act{i}" for i in (1, 2) if fields["stem"] == "deep"}
  for op in prog.ops:
    if op.name.endswith(("/act1", "/act2")):
      expect.add(op.name)
  assert relu_ops(prog) == expect
  assert prog.layer("stem_act").attrs["signed"] == signed
  if k:
    head = prog.layer("head")
    assert head.attrs["proj_max"] == 2047 and head.attrs["in_signed"] == signed


@pytest.mark.parametrize("name", [SIGNED, "deep-bottleneck3x3-avgpool-signed-gcr1"])
def test_value_bounds_hold_every_value_the_interpreter_forms(name):
  """Soundness: on quantized images, uniform int8 and the extremes, every op's output lies in
  its per-channel bounds."""
  _, _, prog = case(name)
  bounds = P.value_bounds(prog)
  rng = np.random.default_rng(0)
  image = prog.input_shape
  x = np.concatenate([np.asarray(P.quantize_input(prog, random_images(image, 16))),
                      rng.integers(-128, 128, (8, *image)),
                      np.full((1, *image), -128), np.full((1, *image), 127),
                      np.where(rng.random((4, *image)) < 0.5, -128, 127)]).astype(np.int8)
  outs = P.interpreter(prog, all_outputs=True)(P.program_arrays(prog), x)
  for op in prog.ops:
    lo, hi = (np.asarray(t) for t in bounds[op.output])
    y = np.asarray(outs[op.name]).reshape(-1, len(lo))
    assert np.all(y >= lo) and np.all(y <= hi), op.name
  assert bounds[prog.layer("stem_act").output][0] == (0,) * len(bounds[prog.layer(
      "stem_act").output][0])


# ----------------------------------------------------------------------------- item 10


def test_signed_activations_after_relu_are_clamped_at_zero():
  """Issue 15 item 10: with ``hawq_signed8`` the model's ReLU comes before a signed 8-bit
  quantizer; the program records it (``relu``) and clamps at 0. Without the attribute (as
  programs saved before it load) the negatives survive: 128-LSB errors."""
  q, qv, prog = case(SIGNED)
  x = random_images(prog.input_shape)
  outs = P.interpreter(prog, all_outputs=True)(P.program_arrays(prog), P.quantize_input(prog, x))
  for name in relu_ops(prog):
    assert int(outs[name].min()) == 0, name
  rep = P.layer_report(prog, q, qv, x, local=True)
  assert rep["local_layers"]["stem_act"]["max_lsb"] <= 1
  legacy_ops = tuple(dataclasses.replace(op, attrs={k: v for k, v in op.attrs.items()
                                                    if k != "relu"}) for op in prog.ops)
  legacy = dataclasses.replace(prog, ops=legacy_ops)
  old = P.interpreter(legacy, all_outputs=True)(P.program_arrays(legacy),
                                                P.quantize_input(prog, x))
  assert int(old["stem_act"].min()) == -128
  assert P.layer_report(legacy, q, qv, x[:64], local=True)["local_layers"]["stem_act"][
      "max_lsb"] >= 64


def _op(kind, name, inputs, output, attrs, arrays=None):
  return P.Op(kind, name, tuple(inputs), output, attrs, arrays or {})


def relu_program(relu=True, signed=True, bits=8):
  """quantize_input (1x1x6) -> requantize x·1 (signed 8-bit, ``relu``) -> global_avg_pool."""
  one = dict(multiplier=np.full(6, 2**30, np.int32), shift=np.full(6, 30, np.int32))
  attrs = dict(bits=bits, signed=signed, saturate=True)
  if relu is not None:
    attrs["relu"] = relu
  ops = (_op("quantize_input", "input_act", [], "x", dict(bits=8, signed=True, scale=1.0)),
         _op("requantize", "act", ["x"], "a", attrs, one),
         _op("global_avg_pool", "pool", ["a"], "out", {}))
  return P.IntegerProgram(ops, (1, 1, 6), "out", 1.0, 6)


RELU_INPUT = np.array([[-128, -5, -1, 0, 3, 127]] * 2, np.int8).reshape(2, 1, 1, 6)


@pytest.mark.parametrize("relu", [True, False, None])
def test_every_back_end_honours_the_recorded_relu(relu):
  """The interpreter, `requantize(relu=...)`, TVM and the ONNX exports clamp a signed
  requantization at 0 exactly when the program says so (None: an old program without the
  attribute, which means False)."""
  prog = relu_program(relu)
  want = np.maximum(RELU_INPUT, 0) if relu else RELU_INPUT.astype(np.int32)
  want = want.reshape(2, 6)
  np.testing.assert_array_equal(np.asarray(P.run(prog, RELU_INPUT)), want)
  assert P.value_bounds(prog)["a"][0] == ((0,) * 6 if relu else (-128,) * 6)
  acc = np.arange(-300, 300, 7, dtype=np.int32)
  np.testing.assert_array_equal(np.asarray(requantize(acc, 2**30, 31, 8, True, relu=bool(relu))),
                                requantize_reference(acc, 2**30, 31, 8, True, relu=bool(relu)))
  try:
    from grassq import deploy
    deploy.require_tvm()
  except ImportError:
    deploy = None
  if deploy is not None:
    got = deploy.build(prog, deploy.GENERIC_TARGET, 2, layout="NHWC")(RELU_INPUT)
    np.testing.assert_array_equal(got, want)
  onnxruntime = pytest.importorskip("onnxruntime")
  del onnxruntime
  from grassq.deploy import onnx_export as OE
  np.testing.assert_array_equal(OE.OnnxModule(OE.to_onnx(prog))(RELU_INPUT), want)
  got = OE.OnnxModule(OE.to_float_onnx(prog))(RELU_INPUT.astype(np.float32))
  np.testing.assert_allclose(got, want, atol=1e-4)


# ----------------------------------------------------------------------------- item 11


@pytest.fixture(scope="module")
def gcr_near_overflow():
  """Issue 15 item 11's setting: a 3-class ResNet-20 (one stage, 8 filters) with a Grassmann
  head of subspace_dim 1, its logit scale chosen so that M lands where ‖p‖·M overflowed int32
  when a projection reached −2048 (M = 1,048,800 > 2^31 / 2048)."""
  fields = dict(block="basic", stem="cifar", stage_sizes=(1,), num_filters=8)
  image = (9, 11, 1)
  q, qv = calibrate(fields, False, 1, image, num_classes=3)
  ref = P.to_program(q, qv, image)
  frac = -round(math.log2(ref.output_scale))
  unit = ref.layer("head").attrs["norm_multiplier"] / 2.0**frac / 25.0  # s_p / s_x
  gamma = 1048800 / (unit * 2.0**frac)
  q = q.clone(head_kwargs={"subspace_dim": 1, "scale": gamma})
  return q, qv, P.to_program(q, qv, image)


def test_grassmann_projections_clamp_symmetrically_and_logits_never_wrap(gcr_near_overflow):
  q, qv, prog = gcr_near_overflow
  head = prog.layer("head")
  big_m = head.attrs["norm_multiplier"]
  assert abs(big_m - 1048800) <= 2 and head.attrs["proj_max"] == 2047
  assert 2047 * big_m <= I32_MAX < 2048 * big_m  # so a projection of −2048 would wrap
  assert P.projection_range(head) == (-2047, 2047)
  x = 3 * random_images(prog.input_shape, 192)  # large inputs: projections saturate both ways
  xq = P.quantize_input(prog, x)
  outs = P.interpreter(prog, all_outputs=True)(P.program_arrays(prog), xq)
  acc = intops.dense_int(np.asarray(outs["head_act"]).astype(np.uint8), head.arrays["weight"])
  p = np.asarray(requantize(acc, head.arrays["multiplier"], head.arrays["shift"], 12, True))
  assert p.min() == -2048 and p.max() == 2047  # the 12-bit range is reached at both ends
  logits = np.asarray(outs["head"])
  assert logits.min() >= 0 and logits.max() <= 2047 * big_m
  fake = np.asarray(jax.jit(q.apply)(qv, x))
  assert np.mean(fake.argmax(-1) == logits.argmax(-1)) >= 0.98
  assert np.abs(logits * prog.output_scale - fake).max() < 0.02 * q.head_kwargs["scale"]
  try:
    from grassq import deploy
    deploy.require_tvm()
  except ImportError:
    pytest.skip("TVM is not installed")
  got = deploy.build(prog, deploy.host_target(), 8)(np.asarray(xq[:8]))
  np.testing.assert_array_equal(got, logits[:8])


def test_norm_multiplier_fits_the_exact_norm_bound_and_backs_off_on_overshoot():
  for k in (1, 2, 3, 8, 511):
    norm_max = math.isqrt(k * 2047**2)
    for ratio in (1.0, 0.37, 1e-3, 123.4):
      m, f = P.norm_multiplier(ratio, k, 2047)
      assert norm_max * m <= I32_MAX < norm_max * 2 * (m + 1)  # the largest F that fits
      assert abs(m - ratio * 2.0**f) <= 0.5
  # k = 2: ‖p‖ ≤ isqrt(2·2047²) = 2894 and (2^31 − 1) / 2894 = 742046.87...; a ratio·2^F of
  # 742046.7 rounds up to 742047, which overflows: F drops by one.
  m, f = P.norm_multiplier(742046.7 / 2**20, 2, 2047)
  assert (m, f) == (371023, 19) and 2894 * m <= I32_MAX
  with pytest.raises(ValueError, match="positive"):
    P.norm_multiplier(0.0, 1, 2047)


# ----------------------------------------------------------------------------- item 12


def test_residual_join_that_could_overflow_is_refused_naming_the_layer():
  """Issue 15 item 12: a residual join calibrated on a tiny range makes its branches'
  requantized values exceed int32; `to_program` refuses the model, naming the join."""
  q, qv, _ = case(SIGNED)
  stats = jax.tree_util.tree_map(lambda a: a, qv["batch_stats"])
  r = stats["stage2_block0"]["add"]["range"]
  stats["stage2_block0"]["add"] = {"range": {**r, "hi": jnp.float32(1e-5)}}
  with pytest.raises(ValueError, match=r"stage2_block0/add\w* .*int32"):
    P.to_program(q, {**qv, "batch_stats": stats}, CASES[SIGNED][3])


BRANCH_M = 2**30 + 2**24  # ×(1 + 2^−6) / 2^(shift − 30)


def branch_program(shift_main, shift_short, pool_hw=(1, 1)):
  """quantize_input -> 1x1 conv (weights 127: acc in [−16256, 16129]) -> two unsaturated
  requantizations (multiplier `BRANCH_M`, the given shifts) -> add -> global_avg_pool ->
  requantize -> dense."""
  h, w = pool_hw
  big = 2**31 - 1
  ops = [
      _op("quantize_input", "input_act", [], "x", dict(bits=8, signed=True, scale=1.0)),
      _op("conv", "conv", ["x"], "a", dict(strides=(1, 1), padding=((0, 0), (0, 0)), w_bits=8,
                                           cout=2, in_bits=8, in_signed=True),
          dict(weight=np.full((1, 1, 1, 2), 127, np.int8), bias=np.zeros(2, np.int32))),
      _op("requantize", "main", ["a"], "r1", dict(bits=32, signed=True, saturate=False),
          dict(multiplier=np.asarray(BRANCH_M, np.int32), shift=np.asarray(shift_main, np.int32))),
      _op("requantize", "short", ["a"], "r2", dict(bits=32, signed=True, saturate=False),
          dict(multiplier=np.asarray(BRANCH_M, np.int32),
               shift=np.asarray(shift_short, np.int32))),
      _op("add", "block/add", ["r1", "r2"], "s", dict(lo=-big - 1, hi=big)),
      _op("global_avg_pool", "pool", ["s"], "g", {}),
      _op("requantize", "head_act", ["g"], "q", dict(bits=8, signed=True, saturate=True),
          dict(multiplier=np.asarray(2**30, np.int32), shift=np.asarray(40, np.int32))),
      _op("dense", "head", ["q"], "out", dict(w_bits=8, cout=2, in_bits=8, in_signed=True),
          dict(weight=np.eye(2, dtype=np.int8), bias=np.zeros(2, np.int32))),
  ]
  return P.IntegerProgram(tuple(ops), (h, w, 1), "out", 1.0, 2)


def test_value_bounds_refuses_each_unprovable_int32_bound(tmp_path):
  # shift 16: each branch ×16640 exactly, within ±2.7e8; their sum within ±5.4e8
  bounds = P.value_bounds(branch_program(16, 16, pool_hw=(1, 3)))
  assert bounds["s"] == ((-2 * 16256 * 16640,) * 2, (2 * 16129 * 16640,) * 2)
  assert bounds["r1"] == ((-16256 * 16640,) * 2, (16129 * 16640,) * 2)
  # shift 14: each branch up to 16256·16640·4 = 1.08e9 fits int32, their sum does not
  overflowing = branch_program(14, 14)
  with pytest.raises(ValueError, match=r"block/add \(add\): the sum of its two branches"):
    P.value_bounds(overflowing)
  with pytest.raises(ValueError, match=r"main \(requantize\).*beyond int32"):
    P.value_bounds(branch_program(13, 16))  # 2.16e9 in one unsaturated branch
  with pytest.raises(ValueError, match=r"pool \(global_avg_pool\).*window sum of 4096"):
    P.value_bounds(branch_program(16, 16, pool_hw=(64, 64)))  # 4096 · 5.4e8
  with pytest.raises(ValueError, match=r"pool \(global_avg_pool\).*window sum of 15"):
    P.value_bounds(branch_program(16, 16, pool_hw=(3, 5)))  # 15 · 5.4e8
  # what `load` reads is checked too
  P.save(overflowing, str(tmp_path / "bad"))
  with pytest.raises(ValueError, match=r"bad: block/add \(add\)"):
    P.load(str(tmp_path / "bad"))


def test_value_bounds_refuses_accumulators_storage_and_head_overflows():
  base = branch_program(16, 16)
  ops = list(base.ops)
  conv = ops[1]
  # a bias that fits int32 but not with the products added to it
  ops[1] = dataclasses.replace(conv, arrays={**conv.arrays, "bias": np.asarray(
      [0, I32_MAX - 1000], np.int32)})
  with pytest.raises(ValueError, match=r"conv \(conv\): the accumulator of output channel 1"):
    P.value_bounds(dataclasses.replace(base, ops=tuple(ops)))
  # an unsigned 8-bit input declared for signed int8 values: they would wrap
  ops[1] = dataclasses.replace(conv, attrs={**conv.attrs, "in_signed": False})
  with pytest.raises(ValueError, match=r"conv \(conv\): its input lies in \[-128, 127\]"):
    P.value_bounds(dataclasses.replace(base, ops=tuple(ops)))
  # a Grassmann head whose ‖p‖·M could overflow: ‖p‖ ≤ isqrt(2·4095²) = 5791, M = 2^20
  head = _op("grassmann_head", "head", ["q"], "out",
             dict(num_classes=1, subspace_dim=2, proj_bits=13, proj_max=4095, w_bits=8, cout=2,
                  in_bits=8, in_signed=True, norm_multiplier=2**20),
             dict(weight=np.full((2, 2), 127, np.int8),
                  multiplier=np.full(2, 2**30, np.int32), shift=np.full(2, 10, np.int32)))
  prog = dataclasses.replace(base, ops=base.ops[:-1] + (head,), num_classes=1)
  with pytest.raises(ValueError, match=r"head \(grassmann_head\): ‖p‖·M can reach"):
    P.value_bounds(prog)
  head = dataclasses.replace(head, attrs={**head.attrs, "norm_multiplier": 2**18})
  P.value_bounds(dataclasses.replace(prog, ops=base.ops[:-1] + (head,)))
  assert intops.check_accumulator_fits(1, 8, 8, True) == 16  # the shape-only check remains


# ----------------------------------------------------------------------------- item 8


def test_batch_size_must_be_a_positive_int():
  deploy = pytest.importorskip("grassq.deploy")
  try:
    deploy.require_tvm()
  except ImportError:
    pytest.skip("TVM is not installed")
  prog = relu_program()
  for bad in (0, -1, True, (0, 1, 1, 6), (-2, 1, 1, 6), (2.0, 1, 1, 6)):
    with pytest.raises(ValueError, match="positive int"):
      deploy.to_relax(prog, bad)
  with pytest.raises(ValueError, match="batch size must be a positive int"):
    deploy.build(prog, deploy.GENERIC_TARGET, 0)
  with pytest.raises(ValueError, match="batch size must be a positive int"):
    deploy.build(prog, deploy.GENERIC_TARGET, -1)
  with pytest.raises(ValueError, match="input_shape"):
    deploy.to_relax(prog, 2.0)
  assert [int(d) for d in deploy.to_relax(prog, np.int64(3))["main"].params[0].ty.shape] == [
      3, 1, 1, 6]
