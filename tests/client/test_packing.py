import torch

from healthd_client.packing import PackedRecord
from healthd_client.quantities.base import Quantity, StepRecord


def test_values_come_back_with_their_shapes_per_quantity():
    a, b = Quantity(), Quantity()
    record = StepRecord(step=0, training=True)
    record.put(a, "scalar", torch.tensor(2.5))
    record.put(a, "vector", torch.tensor([1, 2, 3], dtype=torch.int32))
    record.put(b, "matrix", torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16))
    record.put(b, "flag", torch.tensor(True))
    record.put(b, "host", ["x", "y"])
    packed = PackedRecord(record)
    assert packed.ready()
    values = packed.values()
    assert values[id(a)] == (a, {"scalar": 2.5, "vector": [1.0, 2.0, 3.0]})
    assert values[id(b)] == (b, {"matrix": [[1.0, 2.0], [3.0, 4.0]], "flag": 1.0, "host": ["x", "y"]})


def test_a_packed_value_is_a_snapshot():
    q = Quantity()
    loss = torch.tensor(1.0, dtype=torch.float64)
    record = StepRecord(step=0, training=None)
    record.put(q, "loss", loss)
    packed = PackedRecord(record)
    loss.fill_(7.0)
    assert packed.values()[id(q)][1]["loss"] == 1.0
