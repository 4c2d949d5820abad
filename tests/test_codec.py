from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import lz4.frame
import pytest
import torch
from safetensors.torch import save

from common.codec import (
    FLAG_INT8,
    FLAG_LZ4,
    MAGIC,
    SCALE_SUFFIX,
    VERSION,
    CodecError,
    TensorSpec,
    content_hash,
    decode_tensor,
    decode_tensors,
    encode_tensor,
    encode_tensors,
)

MB = 1 << 20
META = {"iota": json.dumps({"codec": VERSION, "int8": 0})}


def _header(flags: int = 0, magic: bytes = MAGIC, version: int = VERSION) -> bytes:
    return magic + bytes([version, flags])


def _bits(t: torch.Tensor) -> bytes:
    """Raw bytes, so that bitwise equality is checked (torch.equal would treat -0.0 == 0.0)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _sample(dtype: torch.dtype, shape: tuple[int, ...] = (2, 8, 5)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen) * 3).to(dtype)
    return torch.randint(-(2**30), 2**30, shape, generator=gen).to(dtype)


def _spec(t: torch.Tensor) -> TensorSpec:
    return TensorSpec(tuple(t.shape), str(t.dtype).removeprefix("torch."))


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32]
)
def test_round_trip_is_bitwise(dtype: torch.dtype, compress: bool) -> None:
    t = _sample(dtype)
    t.view(-1)[0] = -0.0 if dtype.is_floating_point else -1  # sign of zero must survive too
    out = decode_tensor(encode_tensor(t, compress=compress), _spec(t), max_bytes=MB)
    assert out.dtype == t.dtype and out.device.type == "cpu" and out.shape == t.shape
    assert _bits(out) == _bits(t)


@pytest.mark.parametrize("compress", [False, True])
def test_multi_tensor_dict_round_trip(compress: bool) -> None:
    tensors = {
        "activations": _sample(torch.bfloat16, (1, 16, 8)),
        "ids": torch.arange(16, dtype=torch.int64).reshape(1, 16),
        "mask": torch.tensor([True, False, True]),
        "scalar_loss": torch.tensor(2.5),
    }
    spec = {name: _spec(t) for name, t in tensors.items()}
    out = decode_tensors(encode_tensors(tensors, compress=compress), spec, max_bytes=MB)
    assert out.keys() == tensors.keys()
    for name, t in tensors.items():
        assert out[name].dtype == t.dtype and _bits(out[name]) == _bits(t), name


def test_wildcard_dims_accept_any_size() -> None:
    t = _sample(torch.float32, (3, 7, 4))
    out = decode_tensor(encode_tensor(t), TensorSpec((None, None, 4), "float32"), max_bytes=MB)
    assert torch.equal(out, t)


def test_non_contiguous_and_shared_storage_inputs() -> None:
    base = _sample(torch.float32, (4, 6))
    tensors = {"t": base.T, "row": base[1], "base": base}  # a transposed view and views of one storage
    spec = {name: _spec(t) for name, t in tensors.items()}
    out = decode_tensors(encode_tensors(tensors), spec, max_bytes=MB)
    for name, t in tensors.items():
        assert torch.equal(out[name], t), name


def test_empty_tensors_round_trip() -> None:
    for int8 in (False, True):
        t = torch.empty(3, 0)
        out = decode_tensor(encode_tensor(t, int8=int8), TensorSpec((3, 0), "float32"), max_bytes=MB)
        assert out.shape == (3, 0)


def test_decoded_tensors_are_writable_and_independent() -> None:
    t = _sample(torch.float32, (2, 3))
    data = encode_tensor(t)
    out = decode_tensor(data, _spec(t), max_bytes=MB)
    out.add_(1)  # must not hit read-only memory or alter the payload
    assert torch.equal(decode_tensor(data, _spec(t), max_bytes=MB), t)


def test_lz4_shrinks_compressible_payloads() -> None:
    t = torch.zeros(64, 256)
    plain, packed = encode_tensor(t), encode_tensor(t, compress=True)
    assert packed[5] & FLAG_LZ4 and not plain[5] & FLAG_LZ4
    assert len(packed) < len(plain) / 20


# --- int8 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_int8_error_within_documented_per_row_bound(compress: bool) -> None:
    # Rows of very different magnitude: a per-tensor scale would fail the bound for the small rows.
    t = _sample(torch.float32, (4, 16, 64)) * torch.logspace(-3, 3, 16).reshape(1, 16, 1)
    t[0, 0] = 0.0  # an all-zero row must not divide by zero
    out = decode_tensor(encode_tensor(t, int8=True, compress=compress), _spec(t), max_bytes=MB)
    assert out.dtype == torch.float32
    bound = t.abs().amax(dim=-1, keepdim=True) / 127 / 2
    assert ((out - t).abs() <= bound * (1 + 1e-5)).all()
    assert torch.equal(out[0, 0], torch.zeros(64))


def test_int8_dequantises_to_the_spec_dtype() -> None:
    t = _sample(torch.bfloat16, (2, 8, 32))
    out = decode_tensor(encode_tensor(t, int8=True), _spec(t), max_bytes=MB)
    assert out.dtype == torch.bfloat16
    bound = t.float().abs().amax(dim=-1, keepdim=True) / 127 / 2
    # bfloat16 has 8 mantissa bits: its own rounding of up to 2**-8 relative comes on top.
    assert ((out.float() - t.float()).abs() <= bound + t.float().abs() * 2**-8).all()


def test_int8_is_about_four_times_smaller_than_fp32() -> None:
    t = _sample(torch.float32, (4, 128, 64))
    fp32, int8 = len(encode_tensor(t)), len(encode_tensor(t, int8=True))
    assert fp32 >= t.numel() * 4
    assert 3.5 < fp32 / int8 <= 4.0


def test_int8_leaves_integer_tensors_untouched() -> None:
    tensors = {"ids": torch.tensor([[0, 50_000, 2**40]]), "x": _sample(torch.float32, (1, 3, 8))}
    spec = {name: _spec(t) for name, t in tensors.items()}
    out = decode_tensors(encode_tensors(tensors, int8=True), spec, max_bytes=MB)
    assert out["ids"].dtype == torch.int64 and torch.equal(out["ids"], tensors["ids"])


def test_int8_refuses_to_quantise_non_finite_input() -> None:
    with pytest.raises(CodecError, match="NaN or Inf"):
        encode_tensor(torch.tensor([[1.0, float("nan")]]), int8=True)


def _int8_payload(q: torch.Tensor, scale: torch.Tensor) -> bytes:
    meta = {"iota": json.dumps({"codec": VERSION, "int8": 1, "dtypes": {"tensor": "float32"}})}
    return _header(FLAG_INT8) + save({"tensor": q, "tensor" + SCALE_SUFFIX: scale}, metadata=meta)


@pytest.mark.parametrize(
    ("scale", "match"),
    [
        (torch.tensor([[1.0], [float("nan")]]), "finite"),
        (torch.tensor([[1.0], [float("inf")]]), "finite"),
        (torch.tensor([[1.0], [-0.5]]), "non-negative"),
        (torch.tensor([[1.0]]), "shape"),
        (torch.tensor([1.0, 1.0]), "shape"),
        (torch.tensor([[1.0], [1.0]], dtype=torch.float16), "dtype"),
    ],
)
def test_int8_rejects_bad_scales(scale: torch.Tensor, match: str) -> None:
    q = torch.ones(2, 4, dtype=torch.int8)
    with pytest.raises(CodecError, match=match):
        decode_tensor(_int8_payload(q, scale), TensorSpec((2, 4), "float32"), max_bytes=MB)


def test_int8_checks_recorded_original_dtype() -> None:
    data = encode_tensor(_sample(torch.float16, (2, 4)), int8=True)
    with pytest.raises(CodecError, match="tensor 'tensor' has dtype float16, expected float32"):
        decode_tensor(data, TensorSpec((2, 4), "float32"), max_bytes=MB)


# --- rejection ---------------------------------------------------------------------------------

SPEC = TensorSpec((2, 8, 5), "float32")
GOOD = encode_tensor(_sample(torch.float32))


def _reject(data: bytes, match: str, spec: TensorSpec = SPEC, **kwargs: object) -> None:
    kwargs.setdefault("max_bytes", MB)
    with pytest.raises(CodecError, match=match):
        decode_tensor(data, spec, **kwargs)  # type: ignore[arg-type]


def test_rejects_oversized_payload_before_parsing() -> None:
    # Garbage that is also too big: the size check must fire, not a parse error.
    _reject(b"\xff" * 9000, r"payload is 9000 bytes, limit is 1024", max_bytes=1024)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (GOOD[:-7], "malformed safetensors"),
        (GOOD[:20], "malformed safetensors"),
        (GOOD[:4], "too short"),
        (b"", "too short"),
        (os.urandom(256), "bad magic"),
        (b"XXXX" + GOOD[4:], "bad magic"),
        (_header(version=VERSION + 1) + GOOD[6:], "unsupported codec version"),
        (_header(0b100) + GOOD[6:], "unknown flags"),
        (_header() + os.urandom(256), "malformed safetensors"),
        (_header(FLAG_LZ4) + os.urandom(256), "malformed lz4"),
        (_header(FLAG_LZ4) + lz4.frame.compress(GOOD[6:])[:-10], "malformed lz4"),
        (_header(FLAG_LZ4) + lz4.frame.compress(GOOD[6:]) + b"junk", "trailing"),
        (_header(FLAG_INT8) + GOOD[6:], "metadata"),  # header flag and payload metadata disagree
        (_header() + save({"tensor": _sample(torch.float32)}), "metadata"),  # not written by us
    ],
)
def test_rejects_malformed_payloads(data: bytes, match: str) -> None:
    _reject(data, match)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (TensorSpec((2, 8, 5), "float16"), "tensor 'tensor' has dtype float32, expected float16"),
        (TensorSpec((2, 8, 5), "int64"), "has dtype float32, expected int64"),
        (TensorSpec((2, 8, 4), "float32"), r"has shape \(2, 8, 5\), expected \(2, 8, 4\)"),
        (TensorSpec((None, 9, None), "float32"), r"has shape \(2, 8, 5\), expected \(\*, 9, \*\)"),
        (TensorSpec((16, 5), "float32"), "shape"),
        (TensorSpec((2, 8, 5, 1), "float32"), "shape"),
    ],
)
def test_rejects_spec_mismatch(spec: TensorSpec, match: str) -> None:
    _reject(GOOD, match, spec=spec)
    _reject(encode_tensor(_sample(torch.float32), compress=True), match, spec=spec)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rejects_non_finite(bad: float, dtype: torch.dtype) -> None:
    t = _sample(dtype)
    t[1, 2, 3] = bad
    _reject(encode_tensor(t), "contains NaN or Inf", spec=_spec(t), max_abs=None)


def test_magnitude_bound() -> None:
    t = _sample(torch.float32)
    t[0, 0, 0] = -1e9
    _reject(encode_tensor(t), "magnitude 1e\\+09 above limit 10000", max_abs=1e4)
    _reject(encode_tensor(t), "magnitude")  # the default bound is on too
    assert decode_tensor(encode_tensor(t), SPEC, max_bytes=MB, max_abs=None)[0, 0, 0] == -1e9


def test_rejects_missing_and_unexpected_tensors() -> None:
    data = encode_tensors({"x": torch.ones(2), "y": torch.ones(2)})
    two = {"x": TensorSpec((2,), "float32"), "y": TensorSpec((2,), "float32")}
    with pytest.raises(CodecError, match="unexpected tensor 'y'"):
        decode_tensors(data, {"x": two["x"]}, max_bytes=MB)
    with pytest.raises(CodecError, match="missing tensor 'z'"):
        decode_tensors(data, {**two, "z": two["x"]}, max_bytes=MB)
    # In int8 mode a float tensor without its scale is missing a part.
    q = encode_tensors({"x": torch.ones(2, dtype=torch.int8)}, int8=True)
    with pytest.raises(CodecError, match=f"missing tensor 'x{SCALE_SUFFIX}'"):
        decode_tensors(q, {"x": two["x"]}, max_bytes=MB)


def test_rejects_lz4_bomb() -> None:
    limit = 1 * MB
    big = encode_tensors({"tensor": torch.zeros(64, MB // 16)})[6:]  # 16 MiB of zeros
    bomb = _header(FLAG_LZ4) + lz4.frame.compress(big)
    assert len(bomb) < limit < len(big)  # passes the size check on its face
    _reject(bomb, f"exceeds limit of {limit} bytes", max_bytes=limit)


def _raw_safetensors(header: dict, body: bytes) -> bytes:
    blob = json.dumps({"__metadata__": META, **header}).encode()
    return _header() + struct.pack("<Q", len(blob)) + blob + body


@pytest.mark.parametrize(
    "data",
    [
        # offsets point far beyond the 8-byte body
        _raw_safetensors({"tensor": {"dtype": "F32", "shape": [2], "data_offsets": [0, 10**9]}}, b"\0" * 8),
        # shape claims more elements than the bytes it is given
        _raw_safetensors({"tensor": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 8]}}, b"\0" * 8),
        # a dtype safetensors does not know
        _raw_safetensors({"tensor": {"dtype": "EVIL", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
        # header length claims more than the whole buffer
        _header() + struct.pack("<Q", 2**62) + b"{}",
    ],
)
def test_rejects_lying_safetensors_header(data: bytes) -> None:
    _reject(data, "malformed safetensors", spec=TensorSpec((2,), "float32"))


def test_rejects_wire_dtypes_we_do_not_accept() -> None:
    data = _raw_safetensors({"tensor": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, b"\0\0")
    _reject(data, "has dtype F8_E4M3, expected float32", spec=TensorSpec((2,), "float32"))


class _Hostile:
    """Unpickling this creates a marker directory: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.marker),)


def test_pickle_payloads_are_never_unpickled(tmp_path: Path) -> None:
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Hostile(control)))  # the payload is live: unpickling does run it
    assert control.exists()

    marker = tmp_path / "pwned"
    raw_pickle = pickle.dumps(_Hostile(marker))
    buffer = io.BytesIO()
    torch.save({"tensor": _Hostile(marker)}, buffer)
    for data, match in [
        (_header() + raw_pickle, "malformed safetensors"),
        (_header(FLAG_LZ4) + lz4.frame.compress(raw_pickle), "malformed safetensors"),
        (_header() + buffer.getvalue(), "malformed safetensors"),
        (buffer.getvalue(), "bad magic"),
        (raw_pickle, "bad magic"),
    ]:
        _reject(data, match)
    assert not marker.exists()


# --- encode side and helpers -------------------------------------------------------------------


def test_encode_rejects_reserved_names_and_unsupported_dtypes() -> None:
    with pytest.raises(CodecError, match="reserved"):
        encode_tensors({"x" + SCALE_SUFFIX: torch.ones(1)})
    with pytest.raises(CodecError, match="unsupported dtype"):
        encode_tensor(torch.ones(2, dtype=torch.complex64))


def test_tensor_spec_validates_itself() -> None:
    with pytest.raises(ValueError, match="unsupported dtype"):
        TensorSpec((1,), "float8")
    with pytest.raises(ValueError, match="non-negative"):
        TensorSpec((-1,), "float32")


def test_header_layout() -> None:
    data = encode_tensor(torch.ones(2), int8=True, compress=True)
    assert data[:4] == b"IOTC" and data[4] == VERSION and data[5] == FLAG_LZ4 | FLAG_INT8


def test_content_hash() -> None:
    assert content_hash(GOOD) == hashlib.sha256(GOOD).hexdigest()
    assert len(content_hash(b"")) == 64
    assert content_hash(GOOD) != content_hash(GOOD[:-1] + bytes([GOOD[-1] ^ 1]))


def test_equal_tensors_encode_to_equal_bytes_in_every_process() -> None:
    """Reducers compare results by hash: safetensors' metadata order must not vary between processes."""
    script = (
        "import hashlib, torch; from common.codec import encode_tensors; "
        "t = {'a': torch.arange(12.0).reshape(3, 4), 'b': torch.ones(5)}; "
        "print(hashlib.sha256(encode_tensors(t, int8=True)).hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[1],
        ).stdout.strip()
        for _ in range(4)
    }
    assert len(digests) == 1
