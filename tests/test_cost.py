"""Model size and BOPs from the models themselves match HAWQV3's published figures."""

import pytest

from grassq.models import create_model
from grassq.quant import cost, qresnet


@pytest.fixture(scope="module")
def resnet18():
  m = create_model("resnet18", 1000)
  return cost.layer_costs(m, (224, 224, 3)), cost.total_params(m, (224, 224, 3))


def test_resnet18_size_and_bops_as_published(resnet18):
  c, n = resnet18
  assert round(cost.model_size_mib(c, 32, n, other_bits=32), 1) == 44.6
  assert int(cost.model_size_mib(c, 8, n) * 10) / 10 == 11.1  # 11.15 MiB, printed as 11.1
  assert round(cost.bops(c, 32) / 1e9) == 1858
  assert round(cost.bops(c, 8) / 1e9) == 116


def test_resnet50_v1_bops_as_published():
  c = cost.layer_costs(create_model("resnet50_v1", 1000), (224, 224, 3))
  assert round(cost.bops(c, 32) / 1e9) == 3951
  assert round(cost.bops(c, 8) / 1e9) == 247
  # v1.5 strides on the 3x3 conv: more MACs than v1
  c15 = cost.layer_costs(create_model("resnet50", 1000), (224, 224, 3))
  assert cost.bops(c15, 8) > cost.bops(c, 8)


def test_layer_names_match_the_bit_dict_and_mixed_bits_count(resnet18):
  c, n = resnet18
  q = qresnet.quantized(create_model("resnet18", 1000))
  assert sorted(qresnet.layer_names(q, (224, 224, 3))) == sorted(c)
  conv = c["stage1_block0/conv1"]
  assert conv["params"] == 3 * 3 * 64 * 64 and conv["macs"] == conv["params"] * 56 * 56
  bits = {k: 8 for k in c}
  bits["stage4_block1/conv2"] = 4
  saved = c["stage4_block1/conv2"]["macs"] * (64 - 16)
  assert cost.bops(c, 8) - cost.bops(c, bits) == saved
  assert cost.model_size_mib(c, 8, n) - cost.model_size_mib(c, bits, n) == pytest.approx(
      c["stage4_block1/conv2"]["params"] * 4 / 8 / 2**20)


def test_grassmann_head_is_counted():
  m = create_model("resnet20", 10, head="grassmann", head_kwargs={"subspace_dim": 8})
  c = cost.layer_costs(m, (28, 28, 1))
  assert c["head"] == {"params": 10 * 64 * 8, "macs": 10 * 64 * 8}
  q = qresnet.quantized(m)
  assert sorted(qresnet.layer_names(q, (28, 28, 1))) == sorted(c)
  lin = cost.layer_costs(create_model("resnet20", 10), (28, 28, 1))
  assert {k: v for k, v in c.items() if k != "head"} == {k: v for k, v in lin.items() if k != "head"}
