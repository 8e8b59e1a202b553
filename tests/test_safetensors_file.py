import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loraq.errors import LoraqError
from loraq.formats.checkpoint import read_tensors
from loraq.formats.safetensors_file import SafetensorsFile


@pytest.fixture
def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(5, 7, generator=g),
        "bf16": torch.randn(6, 3, generator=g).bfloat16(),
        "f16": torch.randn(4, generator=g).half(),
        "i64": torch.arange(12).reshape(3, 2, 2),
        "u8": torch.randint(0, 255, (9, 4), generator=g, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }


def test_reads_what_safetensors_reads(tmp_path: Path, tensors):
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    ours = SafetensorsFile(path)
    assert ours.metadata == {"format": "pt"}
    with safe_open(str(path), framework="pt") as theirs:
        assert sorted(ours.keys()) == sorted(theirs.keys())
        for key in theirs.keys():  # noqa: SIM118
            got, want = ours.get_tensor(key), theirs.get_tensor(key)
            assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), key


def test_rows_along_either_dimension(tmp_path: Path, tensors):
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    f = SafetensorsFile(path)
    assert torch.equal(f.rows("f32", 1, 4), tensors["f32"][1:4])
    assert torch.equal(f.rows("f32", 2, 6, dim=1), tensors["f32"][:, 2:6])
    assert torch.equal(f.rows("bf16", 4, 99), tensors["bf16"][4:])
    assert torch.equal(f.rows("i64", 1, 2), tensors["i64"][1:2])
    assert f.rows("u8", 3, 3).shape == (0, 4)
    assert f.is_float("bf16") and not f.is_float("u8") and f.shape("i64") == (3, 2, 2)


def test_loading_maps_no_file(tmp_path: Path, tensors):
    """The point of the reader: a loaded tensor is the process's own memory, and the file is not mapped (with
    safetensors' safe_open every page read stays mapped, counted in RSS, while the handle lives)."""
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    lazy, _ = read_tensors(tmp_path, lazy=True)
    first = lazy["f32"]
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(path) not in maps.read_text()
    assert torch.equal(first, tensors["f32"])


def _write_raw(path: Path, header: dict, data: bytes, length: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes((len(raw) if length is None else length).to_bytes(8, "little") + raw + data)
    return path


@pytest.mark.parametrize(
    "header, data, length, why",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 10**9, "header length"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "offsets"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "needs 12 bytes"),
        ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "tensor a"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "tensor a"),
        ({"a": {"shape": [2]}}, b"", None, "tensor a"),
        ([1, 2], b"", None, "not a JSON object"),
    ],
)
def test_corrupt_files_are_named(tmp_path: Path, header, data, length, why):
    path = _write_raw(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(LoraqError, match=f"bad.safetensors: not a readable safetensors file.*{why}"):
        SafetensorsFile(path)


def test_not_json_and_too_short(tmp_path: Path):
    (tmp_path / "a.safetensors").write_bytes((5).to_bytes(8, "little") + b"{nope")
    with pytest.raises(LoraqError, match="a.safetensors: not a readable safetensors file"):
        SafetensorsFile(tmp_path / "a.safetensors")
    (tmp_path / "b.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(LoraqError, match="b.safetensors: not a readable safetensors file"):
        SafetensorsFile(tmp_path / "b.safetensors")


def test_mapped_tensors_equal_read_ones_and_are_views_of_the_file(tmp_path: Path, tensors):
    """A quantized checkpoint's tensors are kept as stored: views of a private mapping of the file (its pages
    are page cache), equal to what a read gives; a tensor whose data is not aligned to its element size is read."""
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    f = SafetensorsFile(path)
    for key in tensors:
        got = f.mapped(key)
        assert got.dtype == tensors[key].dtype and torch.equal(got, tensors[key])
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(path) in maps.read_text()
    odd = _write_raw(
        tmp_path / "odd.safetensors",
        {
            "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]},
        },
        b"\x01\x02" + torch.tensor([1.5]).numpy().tobytes(),
    )
    g = SafetensorsFile(odd)
    assert g.mapped("a").tolist() == [1, 2] and g.mapped("b").tolist() == [1.5]
    private = f.mapped("f32")
    private.add_(1)  # copy-on-write: the file keeps its bytes
    assert torch.equal(SafetensorsFile(path).get_tensor("f32"), tensors["f32"])
