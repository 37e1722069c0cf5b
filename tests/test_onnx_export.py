"""ONNX export of the integer program on onnxruntime (CPU): a close peer, not bit-exact."""

import dataclasses
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from grassq.deploy import onnx_export as OE  # noqa: E402
from grassq.deploy.bench import random_resnet20  # noqa: E402
from grassq.quant import program as P  # noqa: E402

SHAPE = (28, 28, 1)  # Fashion-MNIST


@pytest.fixture(scope="module")
def w8a8():
  return random_resnet20(SHAPE)


@pytest.fixture(scope="module")
def w4a4_gcr():
  return random_resnet20(SHAPE, default_bits=4, head="grassmann")


@pytest.fixture(scope="module")
def images():
  return np.asarray(jax.random.normal(jax.random.key(7), (48, *SHAPE)))


def _closeness(program, exported, images):
  """(top-1 agreement, max |Δ| / max |logit|, mean |Δ| / mean |logit|) of an exported program
  against the interpreter on the program's quantized images."""
  x = np.asarray(P.quantize_input(program, images))
  want = np.asarray(P.run(program, x), np.int64)
  got = OE.OnnxModule(OE.to_onnx(exported))(x)
  assert got.dtype == np.int32 and got.shape == want.shape
  d = np.abs(got.astype(np.int64) - want)
  return (float(np.mean(got.argmax(-1) == want.argmax(-1))), d.max() / np.abs(want).max(),
          d.mean() / np.abs(want).mean())


@pytest.mark.parametrize("name", ["w8a8", "w4a4_gcr"])
def test_onnxruntime_close_to_interpreter(name, request, images):
  program = request.getfixturevalue(name)
  agree, worst, mean = _closeness(program, program, images)
  # rounding (half-even after a float32 multiply vs the exact dyadic rule) moves a few LSBs
  assert agree >= 0.9
  assert worst < 0.05 and mean < 0.015, (worst, mean)


def test_wrong_scale_is_caught(w8a8, images):
  """One requantization's ratio doubled (shift − 1) in the export: the closeness check fails."""
  target = [op for op in w8a8.ops if op.name == "stage2_block2/act_in"][0]
  ops = tuple(dataclasses.replace(op, arrays=dict(op.arrays, shift=op.arrays["shift"] - 1))
              if op is target else op for op in w8a8.ops)
  _, worst, mean = _closeness(w8a8, dataclasses.replace(w8a8, ops=ops), images)
  assert worst > 0.05 and mean > 0.015


def test_graph_uses_quantized_ops(w8a8):
  ops = {n.op_type for n in OE.to_onnx(w8a8).graph.node}
  assert {"QLinearConv", "ConvInteger", "MatMulInteger"} <= ops
  assert "Conv" not in ops and "MatMul" not in ops  # no float convolution or matmul


def test_float_twin_and_save(w8a8, images, tmp_path):
  import onnx

  path = tmp_path / "float.onnx"
  OE.save(OE.to_float_onnx(w8a8, batch_size=len(images)), str(path))
  module = OE.OnnxModule(onnx.load(str(path)))
  got = module(images.astype(np.float32))
  want = np.asarray(P.run(w8a8, P.quantize_input(w8a8, images)), np.float64)
  assert got.dtype == np.float32 and got.shape == want.shape
  assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.8
  assert np.abs(got - want).max() / np.abs(want).max() < 0.2  # no quantization at all
  ops = {n.op_type for n in onnx.load(str(path)).graph.node}
  assert "Conv" in ops and not any("Quant" in o or "Integer" in o for o in ops)


def test_fixed_batch_refuses_other_shapes(w8a8):
  module = OE.OnnxModule(OE.to_onnx(w8a8, batch_size=2))
  with pytest.raises(Exception, match="(?i)dimension|shape"):
    module(np.zeros((3, *SHAPE), np.int8))


def test_unsupported_op_refused(w8a8):
  bad = dataclasses.replace(w8a8, ops=(*w8a8.ops[:-1], dataclasses.replace(
      w8a8.ops[-1], kind="softmax")))
  with pytest.raises(NotImplementedError, match="softmax"):
    OE.to_onnx(bad)


def test_missing_onnx_names_the_extra(monkeypatch, w8a8):
  monkeypatch.setitem(sys.modules, "onnx", None)
  with pytest.raises(ImportError, match=r"pip install grassq\[onnx\]"):
    OE.to_onnx(w8a8)
  monkeypatch.setitem(sys.modules, "onnxruntime", None)
  with pytest.raises(ImportError, match=r"pip install grassq\[onnx\]"):
    OE.OnnxModule(b"")
