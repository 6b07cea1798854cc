"""export.SafetensorsWriter writes, tensor by tensor, files that safetensors itself reads back exactly."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from relora_ds.tools.export import SafetensorsWriter


def test_round_trip_every_dtype(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(7, 3, generator=g), "b": torch.randn(5, generator=g).bfloat16(),
               "c": torch.randn(2, 2, 2, generator=g).half(), "steps": torch.arange(3), "mask": torch.tensor([True, False]),
               "scalar": torch.tensor(1.5)}
    path = str(tmp_path / "x.safetensors")
    with SafetensorsWriter(path, [(k, v.dtype, v.shape) for k, v in tensors.items()], {"format": "pt"}) as w:
        for name, tensor in tensors.items():
            w.write(name, tensor)
    back = load_file(path)
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_non_contiguous_input_is_written_in_logical_order(tmp_path):
    t = torch.arange(12.0).view(3, 4).t()
    path = str(tmp_path / "t.safetensors")
    with SafetensorsWriter(path, [("t", t.dtype, t.shape)]) as w:
        w.write("t", t)
    assert torch.equal(load_file(path)["t"], t)


def test_a_tensor_the_header_did_not_promise_is_refused(tmp_path):
    path = str(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="promised"):
        with SafetensorsWriter(path, [("a", torch.float32, (2,))]) as w:
            w.write("a", torch.zeros(3))
    with pytest.raises(ValueError, match="not written"):
        with SafetensorsWriter(path, [("a", torch.float32, (2,)), ("b", torch.float32, (1,))]) as w:
            w.write("a", torch.zeros(2))
