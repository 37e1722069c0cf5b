"""grassq.deploy: the TVM Relax lowering agrees bit for bit with the JAX int32 interpreter."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from grassq import deploy  # noqa: E402
from grassq.models import create_model  # noqa: E402
from grassq.quant import intops, qinception, qresnet, requantize_reference  # noqa: E402
from grassq.quant import program as P  # noqa: E402
from test_inception import random_variables  # noqa: E402  (tests/ is on sys.path under pytest)

IMAGE = (16, 16, 1)
RESNET_D_IMAGE = (12, 12, 1)  # deep stem + max pool: 3x3 into stage 2, an odd size to pool
INCEPTION_IMAGE = (13, 13, 1)  # the smallest the small stem takes: 7x7 -> Mixed_6a 3x3 -> 1x1
BATCH = 6


def fresh_rng():
  """A random generator seeded afresh each run; the seed goes into failure messages."""
  seed = int(np.random.SeedSequence().entropy % 2**32)
  return np.random.default_rng(seed), seed


def calibrated_program(model_name, *, num_classes=10, bits=None, default_bits=8,
                       default_act_bits=0, hawq_signed8=False, image=IMAGE, **model_kwargs):
  """The integer program of a small QResNet whose activation ranges saw one training batch."""
  model = create_model(model_name, num_classes, zero_init_residual=False, **model_kwargs)
  q = qresnet.quantized(model, bits=bits, default_bits=default_bits,
                        default_act_bits=default_act_bits, fix_bn=True, hawq_signed8=hawq_signed8)
  x = jax.random.normal(jax.random.key(3), (8, *image))
  qv = jax.jit(q.init)(jax.random.key(0), x[:1])
  _, upd = jax.jit(lambda v, x: q.apply(v, x, train=True, mutable=["batch_stats"]))(qv, x)
  return P.to_program(q, {**qv, "batch_stats": upd["batch_stats"]}, image)


def calibrated_inception_program(image=INCEPTION_IMAGE):
  """The W8A8 integer program of a tiny `inception_v3_small` (one block of each type A-E at
  1/8 width): random float variables drawn on the host (no initializer to compile), QAT
  ranges calibrated on one batch."""
  model = create_model("inception_v3_small", 10, pool_features=(32,), c7=(128,), e_blocks=1)
  rng, key = np.random.default_rng(0), jax.random.key(0, impl="rbg")
  x = rng.normal(size=(16, *image)).astype(np.float32)

  v = random_variables(model, rng, image)
  q = qinception.quantized(model)
  template = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                    jax.eval_shape(q.init, key, x[:1]))
  qv = qinception.from_float(v, template)
  _, upd = jax.jit(lambda v, x: q.apply(v, x, train=True, mutable=["batch_stats"]))(qv, x)
  return P.to_program(q, {**qv, **upd}, image)


def images(program, rng):
  """int8 inputs: quantized normal images, uniform int8, and the extremes −128 and 127."""
  h, w, c = program.input_shape
  x = np.array(P.quantize_input(program, rng.normal(size=(BATCH, h, w, c)).astype(np.float32)))
  x[1] = rng.integers(-128, 128, (h, w, c))
  x[2], x[3] = -128, 127
  x[4] = np.where(rng.random((h, w, c)) < 0.5, -128, 127)
  return x.astype(np.int8)


def assert_bit_exact(program, module, rng, seed):
  x = images(program, rng)
  want = np.asarray(P.run(program, x))
  got = module(x)
  assert got.dtype == np.int32 and got.shape == (BATCH, program.num_classes)
  np.testing.assert_array_equal(got, want, err_msg=f"seed {seed}")
  assert len(np.unique(want)) > BATCH  # not a degenerate (constant) program


@pytest.fixture(scope="module")
def w4a8_gcr():
  """W4A8 CIFAR ResNet with conv projection shortcuts and a 4-bit integer Grassmann head (15
  packed output columns: an odd count)."""
  prog = calibrated_program("resnet20", num_classes=5, stage_sizes=(1, 1, 1), default_bits=4,
                            default_act_bits=8, bits={"head": 4}, head="grassmann",
                            head_kwargs={"subspace_dim": 3})
  return prog, deploy.build(prog, deploy.host_target(), BATCH)


@pytest.fixture(scope="module")
def w8a8_imagenet():
  """W8A8 (one int4 conv) ImageNet-style ResNet-D: deep stem, max pool, bottlenecks, avg-pool
  shortcut, signed 8-bit activations, linear head; built for this CPU and for any x86-64."""
  prog = calibrated_program("resnet50d", stage_sizes=(1, 1), num_filters=4, hawq_signed8=True,
                            bits={"stage2_block0/conv2": 4}, image=RESNET_D_IMAGE)
  return prog, {"host": deploy.build(prog, deploy.host_target(), BATCH),
                "generic": deploy.build(prog, deploy.GENERIC_TARGET, BATCH)}


def vnni_instructions(module):
  """How many vpdpbusd the module's compiled code holds."""
  return sum(m.inspect_source("asm").count("vpdpbusd") for m in module.executable.mod.imports
             if m.kind == "llvm")


def test_w4a8_grassmann_program_is_bit_exact(w4a8_gcr):
  prog, module = w4a8_gcr
  kinds = {op.kind for op in prog.ops}
  assert {"grassmann_head", "conv", "add"} <= kinds
  assert prog.layer("stage2_block0/proj_conv").attrs["w_bits"] == 4
  assert prog.layer("head").arrays["weight"].shape[-1] == 8  # 15 columns packed two per byte
  rng, seed = fresh_rng()
  assert_bit_exact(prog, module, rng, seed)
  if deploy.target_has_vnni(deploy.host_target()):  # NCHW16c convs tensorized with VNNI
    assert vnni_instructions(module) > 0


@pytest.mark.parametrize("target", ["host", "generic"])
def test_w8a8_imagenet_style_program_is_bit_exact(w8a8_imagenet, target):
  prog, modules = w8a8_imagenet
  kinds = [op.kind for op in prog.ops]
  assert "max_pool" in kinds and "avg_pool" in kinds and kinds[-2:] == ["dense", "requantize"]
  assert prog.layer("stage1_block0/conv1").attrs["in_signed"]  # x ⊕ 0x80 on the VNNI path
  # ResNet-D's shortcut pool over 3x3: padding SAME, the edge windows averaging 2 and 1 values
  pool = prog.layer("stage2_block0/proj_pool").attrs
  assert pool["padding"] == ((0, 1), (0, 1)) and not pool["count_include_pad"]
  rng, seed = fresh_rng()
  assert_bit_exact(prog, modules[target], rng, seed)
  if target == "generic":
    assert vnni_instructions(modules[target]) == 0


def test_rgb_stem_reads_a_four_channel_block_bit_exactly():
  """A 3-channel stem multiplies a 4-channel block (NCHW4c), every later conv 16-channel ones
  (each conv's uint8 input buffer, its last dimension the block), and stays bit-exact."""
  import re

  prog = calibrated_program("resnet20", num_classes=5, stage_sizes=(1, 1, 1), image=(8, 8, 3))
  text = deploy.to_relax(prog, BATCH, "NCHW16c").script()
  shapes = re.findall(r'def conv2d_NCHWc_int8\d*\(\w+: T\.Buffer\(\((.+?)\), "uint8"\)', text)
  blocks = [re.findall(r"\d+", shape)[-1] for shape in shapes]
  assert len(blocks) > 4 and blocks[0] == "4" and set(blocks[1:]) == {"16"}, blocks
  rng, seed = fresh_rng()
  assert_bit_exact(prog, deploy.build(prog, deploy.host_target(), BATCH), rng, seed)


@pytest.fixture(scope="module")
def w8a8_inception():
  prog = calibrated_inception_program()
  return prog, {"host": deploy.build(prog, deploy.host_target(), BATCH),
                "generic": deploy.build(prog, deploy.GENERIC_TARGET, BATCH)}


@pytest.mark.parametrize("target", ["host", "generic"])
def test_w8a8_inception_program_is_bit_exact(w8a8_inception, target):
  """InceptionV3 (issue 7): branch concatenations with a requantization per branch, max pools
  on int32 accumulators, 3x3/1 average pools counting their padding, 1x7/7x1 and 1x3/3x1
  convolutions, a 1x1 map in the last block; NCHW16c + VNNI on the host, NHWC generic."""
  prog, modules = w8a8_inception
  kinds = [op.kind for op in prog.ops]
  assert kinds.count("concat") == 5  # one per block, named after the quantizer that follows
  assert {"max_pool", "avg_pool", "conv", "dense"} <= set(kinds)
  producers = {op.output: op for op in prog.ops}
  # Mixed_5b's four branches and Mixed_7b's six leaves (its splits), each requantized on its own
  for name, n in (("Mixed_6a/act_in", 4), ("final_act", 6)):
    cat = prog.layer(name)
    assert cat.kind == "concat" and len(cat.inputs) == n
    assert all(producers[t].kind == "requantize" for t in cat.inputs)
  assert any(op.kind == "avg_pool" and op.attrs["count_include_pad"] for op in prog.ops)
  rng, seed = fresh_rng()
  assert_bit_exact(prog, modules[target], rng, seed)


def _op(kind, name, inputs, output, attrs, arrays=None):
  return P.Op(kind, name, tuple(inputs), output, attrs, arrays or {})


def synthetic_program(rng):
  """Hand-made ops the ResNets do not produce: a padded max pool over signed int8, asymmetric
  conv padding, a padded 3x3/1 avg pool counting the padding (Inception's), a channel concat, a
  2x2 avg pool of signed 4-bit values over odd sizes (floor of negatives), a conv on 16-bit
  signed inputs, a residual add with its clamp, an odd int4 dense layer; random weights and
  dyadic factors."""
  def dyadic_like(n, lo, hi):
    return (rng.integers(2**30, 2**31 - 1, n).astype(np.int32),
            rng.integers(lo, hi + 1, n).astype(np.int32))

  w1 = rng.integers(-8, 8, (3, 3, 1, 5))
  w2 = rng.integers(-128, 128, (3, 3, 10, 4)).astype(np.int8)
  w3 = rng.integers(-8, 8, (4, 3))
  m1, c1 = dyadic_like(5, 35, 37)
  m2, c2 = dyadic_like(1, 20, 22)
  m3, c3 = dyadic_like(4, 36, 38)
  m4, c4 = dyadic_like(4, 35, 38)
  m5, c5 = dyadic_like(1, 38, 40)
  m6, c6 = dyadic_like(3, 30, 32)
  m7, c7 = dyadic_like(5, 30, 30)
  i32 = lambda n, r: rng.integers(-r, r, n).astype(np.int32)
  ops = (
      _op("quantize_input", "input", [], "x", dict(bits=8, signed=True, scale=0.05)),
      _op("max_pool", "maxpool", ["x"], "p1", dict(window=(3, 3), strides=(1, 1),
                                                   padding=((1, 1), (0, 1)))),
      _op("conv", "conv1", ["p1"], "a1", dict(strides=(2, 2), padding=((0, 1), (1, 0)), w_bits=4,
                                              cout=5, in_bits=8, in_signed=True),
          dict(weight=intops.pack_int4(w1), bias=i32(5, 500))),
      _op("requantize", "act1", ["a1"], "q1", dict(bits=4, signed=True, saturate=True),
          dict(multiplier=m1, shift=c1)),
      _op("avg_pool", "avgpool_same", ["q1"], "p3", dict(
          window=(3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=True)),
      _op("requantize", "act_b", ["p3"], "q4", dict(bits=4, signed=True, saturate=True),
          dict(multiplier=m7, shift=c7)),
      _op("concat", "cat", ["q1", "q4"], "c", dict(bits=4, signed=True)),
      _op("avg_pool", "avgpool", ["c"], "p2", dict(window=(2, 2), strides=(2, 2))),
      _op("requantize", "act2", ["p2"], "q2", dict(bits=16, signed=True, saturate=True),
          dict(multiplier=m2, shift=c2)),
      _op("conv", "conv2", ["q2"], "a2", dict(strides=(1, 1), padding=((1, 1), (1, 1)), w_bits=8,
                                              cout=4, in_bits=16, in_signed=True),
          dict(weight=w2, bias=i32(4, 10**5))),
      _op("requantize", "main", ["a2"], "r1", dict(bits=32, signed=True, saturate=False),
          dict(multiplier=m3, shift=c3)),
      _op("requantize", "shortcut", ["a2"], "r2", dict(bits=32, signed=True, saturate=False),
          dict(multiplier=m4, shift=c4)),
      _op("add", "add", ["r1", "r2"], "s", dict(lo=-300, hi=2**16 - 1)),
      _op("global_avg_pool", "pool", ["s"], "g", {}),
      _op("requantize", "act3", ["g"], "q3", dict(bits=8, signed=True, saturate=True),
          dict(multiplier=m5, shift=c5)),
      _op("dense", "fc", ["q3"], "f", dict(w_bits=4, cout=3, in_bits=8, in_signed=True),
          dict(weight=intops.pack_int4(w3), bias=i32(3, 50))),
      _op("requantize", "logits", ["f"], "out", dict(bits=32, signed=True, saturate=True),
          dict(multiplier=m6, shift=c6)),
  )
  return P.IntegerProgram(ops, (13, 11, 1), "out", 1.0, 3)


def test_synthetic_program_is_bit_exact_in_both_layouts():
  rng, seed = fresh_rng()
  prog = synthetic_program(rng)
  x = rng.integers(-128, 128, (BATCH, 13, 11, 1)).astype(np.int8)
  x[0], x[1] = -128, 127
  want = np.asarray(P.run(prog, x))
  assert len(np.unique(want)) > 3, f"seed {seed}: degenerate logits {want}"
  assert np.abs(want).max() < 2**20, f"seed {seed}: saturated logits {want}"
  for target, layout in [(deploy.host_target(), "NCHW16c"), (deploy.host_target(), "NHWC")]:
    got = deploy.build(prog, target, BATCH, layout=layout)(x)
    np.testing.assert_array_equal(got, want, err_msg=f"seed {seed}, {target}, {layout}")


# (bits, signed, saturate), as in tests/test_quant_dyadic.py
COMBOS = [(8, False, True), (8, True, True), (4, True, True), (16, True, True), (32, True, True),
          (32, True, False)]


@pytest.mark.parametrize("bits,signed,saturate", COMBOS)
def test_requantize_matches_python_big_integers(bits, signed, saturate):
  rng, seed = fresh_rng()
  n = 4096
  acc = rng.integers(-2**31, 2**31, n, dtype=np.int64)
  acc[:6] = [-2**31, 2**31 - 1, 0, -1, 1, -2**30]
  multiplier = rng.integers(2**30, 2**31, n, dtype=np.int64)
  multiplier[:n // 8] = rng.integers(-2**31, 2**31, n // 8)  # any int32 is exact
  multiplier[6:9] = [2**31 - 1, -2**31, 2**30]
  shift = rng.integers(1, 63, n)
  shift[: n // 2] = rng.integers(20, 40, n // 2)  # where results are mostly inside the range
  shift[9:12] = [1, 62, 31]
  # ties round half up: 3·2^30 / 2^31 = 1.5 -> 2 and −1.5 -> −1
  acc[12:14], multiplier[12:14], shift[12:14] = [3, -3], 2**30, 31
  acc, multiplier, shift = (a.astype(np.int32) for a in (acc, multiplier, shift))
  mod = deploy.requantize_module(multiplier, shift, bits, signed, saturate)
  executable = tvm.compile(mod, tvm.target.Target(deploy.GENERIC_TARGET))
  vm = tvm.relax.VirtualMachine(executable, tvm.cpu())
  got = vm["main"](tvm.runtime.tensor(acc)).numpy()
  want = requantize_reference(acc, multiplier, shift, bits, signed, saturate)
  np.testing.assert_array_equal(got, want, err_msg=f"seed {seed}")
  assert got[12] == 2 and got[13] == (0 if not signed else -1)
  with pytest.raises(ValueError, match="shift"):
    deploy.requantize_module(multiplier[:2], np.array([0, 63], np.int32), bits, signed, saturate)


def test_save_load_round_trip(w4a8_gcr, tmp_path):
  prog, module = w4a8_gcr
  path = tmp_path / "models" / "w4a8.so"
  deploy.save(module, str(path))
  deploy.save(module, str(path))  # replaces it
  # the library and its SHA-256, no temporary files left behind
  assert sorted(os.listdir(path.parent)) == ["w4a8.so", "w4a8.so.sha256"]
  back = deploy.load(str(path))
  assert back.input_shape == (BATCH, *IMAGE) and back.output_shape == (BATCH, 5)
  rng, seed = fresh_rng()
  x = images(prog, rng)
  np.testing.assert_array_equal(back(x), module(x), err_msg=f"seed {seed}")
  with pytest.raises(FileNotFoundError):
    deploy.load(str(tmp_path / "missing.so"))


RUNTIME_ONLY_RUN = """
import sys
import numpy as np
import tvm
assert tvm.base._RUNTIME_ONLY, "TVM's compiler library was loaded"
from grassq import deploy
module = deploy.load(sys.argv[1])
np.save(sys.argv[3], module(np.load(sys.argv[2])))
"""


def test_saved_module_runs_on_tvm_runtime_alone(w4a8_gcr, tmp_path):
  """The .so loads and runs bit-exactly in a process whose TVM has only its runtime library (as
  on a deployment machine without TVM's compiler)."""
  import subprocess

  prog, module = w4a8_gcr
  path = str(tmp_path / "w4a8.so")
  deploy.save(module, path)
  rng, seed = fresh_rng()
  x = images(prog, rng)
  np.save(tmp_path / "x.npy", x)
  env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
  subprocess.run([sys.executable, "-c", RUNTIME_ONLY_RUN, path, str(tmp_path / "x.npy"),
                  str(tmp_path / "y.npy")], check=True, env=env, timeout=300)
  np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), np.asarray(P.run(prog, x)),
                                err_msg=f"seed {seed}")
  # no temporaries left
  assert sorted(os.listdir(tmp_path)) == ["w4a8.so", "w4a8.so.sha256", "x.npy", "y.npy"]


def elf_section(data: bytes, name: str):
  """(offset, size) of the section `name` of a little-endian ELF64 file's bytes."""
  import struct

  assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not a little-endian ELF64"
  (shoff,) = struct.unpack_from("<Q", data, 0x28)
  shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
  # each header: sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, ...
  headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
  headers = [(h[0], h[4], h[5]) for h in headers]  # (name offset, file offset, size)
  strings = headers[shstrndx][1]
  for name_at, offset, size in headers:
    start = strings + name_at
    if data[start:data.index(b"\0", start)].decode() == name:
      return offset, size
  raise KeyError(f"no ELF section {name}")


CORRUPT_LOAD = """
import json, sys
import tvm
assert tvm.base._RUNTIME_ONLY, "TVM's compiler library was loaded"
from grassq import deploy, files
mapped = []
load_module = tvm.runtime.load_module
tvm.runtime.load_module = lambda path, *a: mapped.append(path) or load_module(path, *a)
out = {}
for path in sys.argv[2:]:
  try:
    deploy.load(path)
    out[path] = "loaded"
  except files.CorruptFileError as e:
    out[path] = str(e)
  assert not mapped, f"{path} was mapped"
deploy.load(sys.argv[1])  # the intact library: mapped through the wrapper, so it saw them all
assert mapped == [sys.argv[1]], mapped
print(json.dumps(out))
"""


def test_damaged_module_is_refused_before_it_is_mapped(w4a8_gcr, tmp_path):
  """Issue 15, defect 7: a library cut to 10 % (SIGBUS in TVM's loader), 16 bytes flipped in
  .rodata (ran and returned wrong logits) or .text (SIGILL) or anywhere, a missing or damaged
  checksum file: each refused with CorruptFileError before TVM maps it, in a runtime-only TVM
  (a subprocess, so a regression that crashes cannot take pytest down)."""
  import hashlib
  import json
  import subprocess

  _, module = w4a8_gcr
  good = tmp_path / "good.so"
  deploy.save(module, str(good))
  data = good.read_bytes()
  record = (tmp_path / "good.so.sha256").read_text()
  assert record.split() == [hashlib.sha256(data).hexdigest(), "good.so"]

  def flipped(at):
    b = bytearray(data)
    b[at:at + 16] = bytes(x ^ 0xFF for x in b[at:at + 16])
    return bytes(b)

  rodata, text = elf_section(data, ".rodata"), elf_section(data, ".text")
  bad = {"truncated": data[:len(data) // 10],
         "rodata": flipped(rodata[0] + rodata[1] // 2), "text": flipped(text[0] + text[1] // 2),
         "middle": flipped(len(data) // 2), "unrecorded": data, "bad_record": data}
  paths = {}
  for name, blob in bad.items():
    path = tmp_path / f"{name}.so"
    path.write_bytes(blob)
    if name == "bad_record":
      (tmp_path / f"{name}.so.sha256").write_text("0123 not a digest\n")
    elif name != "unrecorded":
      (tmp_path / f"{name}.so.sha256").write_text(record)
    paths[name] = str(path)
  env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
  r = subprocess.run([sys.executable, "-c", CORRUPT_LOAD, str(good), *paths.values()], env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, f"returncode {r.returncode}: {r.stderr[-3000:]}"
  refused = json.loads(r.stdout.strip().splitlines()[-1])
  for name, path in paths.items():
    msg = refused[path]
    assert path in msg and "was not loaded" in msg and "again" in msg, (name, msg)
    if name == "unrecorded":
      assert "no checksum file" in msg, msg
    elif name == "bad_record":
      assert "damaged" in msg, msg
    else:
      assert "does not match its recorded SHA-256" in msg, (name, msg)


def test_cuda_module_is_cross_compiled_without_a_gpu(tmp_path):
  """A T4 module is compiled and written on a machine with no GPU; its kernels travel inside
  the library as CUDA source (compiled by NVRTC when a GPU machine loads it)."""
  rng, _ = fresh_rng()
  prog = synthetic_program(rng)
  path = tmp_path / "t4.so"
  deploy.export(prog, str(path), deploy.CUDA_T4_TARGET, 2)
  blob = path.read_bytes()
  assert b"__global__" in blob and b"int8_t" in blob
  if not tvm.cuda(0).exist:
    with pytest.raises(RuntimeError, match="no CUDA device"):
      deploy.load(str(path), "cuda")
  with pytest.raises(ValueError, match="use llvm or cuda"):
    deploy.export(prog, str(tmp_path / "x.so"), {"kind": "opencl"}, 2)
  assert sorted(os.listdir(tmp_path)) == ["t4.so", "t4.so.sha256"]


def test_tvm_uses_every_physical_core_unless_told_otherwise():
  """TVM's own default is half the logical CPUs (it assumes SMT): 1 worker on a 2-core machine
  without SMT, which ran ResNet-18 int8 at half speed here."""
  import subprocess

  code = ("from grassq import deploy; from grassq.deploy.relax import physical_cores; "
          "import tvm; deploy.require_tvm_runtime(); "
          "print(tvm.runtime.num_threads(), physical_cores())")
  env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True, timeout=120).stdout.split()
  assert out[0] == out[1] and int(out[0]) >= 1
  env["TVM_NUM_THREADS"] = "1"  # the user's choice wins
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True, timeout=120).stdout.split()
  assert out[0] == "1"


def test_bad_inputs_are_refused(w4a8_gcr):
  prog, module = w4a8_gcr
  x = np.zeros((BATCH, *IMAGE), np.int8)
  for bad in (x.astype(np.float32), x.astype(np.uint8), x.astype(np.int32),
              x[:BATCH - 1], np.zeros((BATCH, 16, 15, 1), np.int8)):
    with pytest.raises(ValueError, match=r"int8 images of shape \(6, 16, 16, 1\)"):
      module(bad)
  with pytest.raises(ValueError, match="input_shape"):
    deploy.to_relax(prog, (BATCH, 28, 28, 1))
  with pytest.raises(TypeError, match="target"):
    deploy.build(prog, 42, BATCH)


def test_module_signature(w4a8_gcr):
  prog, _ = w4a8_gcr
  mod = deploy.to_relax(prog, 2)
  main = mod["main"]
  assert str(main.params[0].ty.dtype) == "int8"
  assert [int(d) for d in main.params[0].ty.shape] == [2, *IMAGE]
  assert str(main.ret_ty.dtype) == "int32"
  # int4 weights travel packed two per int8 byte, never as TVM's int4 dtype (wrong on llvm)
  assert "int4" not in mod.script(show_meta=False)


def test_cuda_kernels_are_generated_without_a_gpu():
  rng, _ = fresh_rng()
  prog = synthetic_program(rng)
  src = deploy.cuda_source(prog, 2)
  counts = deploy.int8_instructions(src)
  assert "__global__" in src and counts["kernels"] >= 5
  assert set(counts) == {"kernels", "dp4a", "mma"}
  if not tvm.cuda(0).exist:
    with pytest.raises(RuntimeError, match="no CUDA device"):
      deploy.build(prog, deploy.CUDA_T4_TARGET, 2)


def test_missing_tvm_says_how_to_install(monkeypatch):
  for name in [m for m in sys.modules if m == "tvm" or m.startswith("tvm.")]:
    monkeypatch.delitem(sys.modules, name)
  monkeypatch.setitem(sys.modules, "tvm", None)  # import tvm now raises ImportError
  with pytest.raises(ImportError, match=r"pip install grassq\[tvm\]"):
    deploy.require_tvm()
  with pytest.raises(ImportError, match=r"pip install grassq\[tvm\]"):
    deploy.build(None, deploy.GENERIC_TARGET)


def _shape_of(layer):
  return (layer.name, layer.kind, layer.in_shape, layer.kernel, layer.strides, layer.padding)


def test_latency_table_plugs_into_cost_tables():
  """Issue 6 item 4: every layer of `layer_costs` at every bit-width, measured on this CPU."""
  from grassq import mixed
  from grassq.quant import cost

  model = create_model("resnet20", 10, stage_sizes=(1, 1, 1), num_filters=64)
  shape = (24, 24, 1)
  table = deploy.latency_table(model, shape, deploy.host_target(), bits=(4, 8), repeats=3,
                               min_repeat_ms=5)
  macs = {n: c["macs"] for n, c in cost.layer_costs(model, shape).items()}
  assert list(table) == list(macs) and all(set(t) == {4, 8} for t in table.values())
  assert all(np.isfinite(s) and 0 < s < 1 for t in table.values() for s in t.values())
  costs = mixed.cost_tables(model, shape, latency=table)  # validates names and bits
  assert costs["latency"] == table
  # 3x3 64->64 at 24x24 (21M MACs) against 1x1 128->256 at 6x6 (1.2M): compute, not overhead
  # (not the stem: its one input channel is padded to a 16-channel block, 16x its MACs)
  big, small = "stage1_block0/conv1", "stage3_block0/proj_conv"
  assert macs[big] == max(macs.values()) and macs[big] > 15 * macs[small]
  for b in (4, 8):
    assert table[big][b] > 1.5 * table[small][b] > 1.5 * table["head"][b], table
  with pytest.raises(ValueError, match="bits"):
    deploy.latency_table(model, shape, bits=(16,))


def test_program_layers_have_the_model_layers_shapes(w8a8_imagenet, w8a8_inception):
  """The layers a latency table times for a program are the model's, shape for shape (the
  ResNet-D shortcut pool's SAME padding included)."""
  prog, _ = w8a8_imagenet
  model = create_model("resnet50d", 10, stage_sizes=(1, 1), num_filters=4)
  from_prog = sorted(map(_shape_of, deploy.program_layers(prog)))
  assert from_prog == sorted(map(_shape_of, deploy.model_layers(model, RESNET_D_IMAGE)))
  proj = next(layer for layer in deploy.program_layers(prog)
              if layer.name == "stage2_block0/proj_conv")
  assert proj.in_shape[:2] == (2, 2)  # 3x3 pooled 2x2/2 with SAME padding
  inception_prog, _ = w8a8_inception
  model = create_model("inception_v3_small", 10, pool_features=(32,), c7=(128,), e_blocks=1)
  assert (sorted(map(_shape_of, deploy.program_layers(inception_prog))) ==
          sorted(map(_shape_of, deploy.model_layers(model, INCEPTION_IMAGE))))


def test_deploy_and_check_reports_bit_exactness_accuracy_and_latency(w4a8_gcr, tmp_path):
  """experiments.deploy's core: 13 images (the batch-8 evaluation pads the last batch)."""
  from experiments.stages import deploy_and_check

  prog, _ = w4a8_gcr
  rng, seed = fresh_rng()
  images = rng.normal(size=(13, *IMAGE)).astype(np.float32)
  labels = rng.integers(0, 5, 13)
  r = deploy_and_check(prog, images, labels, str(tmp_path / "modules"), "w4a8",
                       target=deploy.GENERIC_TARGET, batch_sizes=(8, 1), repeats=3)
  assert r["bit_exact"] and r["mismatches"] == 0 and r["reload_exact"], f"seed {seed}: {r}"
  assert r["eval_images"] == 13 and r["accuracy_tvm"] == r["accuracy_int"]
  want = np.asarray(P.run(prog, P.quantize_input(prog, images))).argmax(-1)
  assert r["accuracy_int"] == np.mean(want == labels)
  assert sorted(os.listdir(tmp_path / "modules")) == ["w4a8.so", "w4a8.so.sha256", "w4a8_b8.so",
                                                       "w4a8_b8.so.sha256"]
  assert r["module_path"] == str(tmp_path / "modules" / "w4a8.so")
  assert deploy.load(r["module_path"]).input_shape == (1, *IMAGE)
  for path in ("tvm", "interpreter"):
    assert set(r["latency_ms"][path]) == {1, 8}
    assert all(0 < ms < 1e4 for ms in r["latency_ms"][path].values())
  with pytest.raises(ValueError, match="images"):
    deploy_and_check(prog, images[:3], labels, str(tmp_path), "x", batch_sizes=(1,))
