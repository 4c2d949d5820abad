"""Tensors to bytes and back for everything that crosses between miners via S3.

Wire format: a 6-byte header, then a safetensors payload (optionally lz4-framed as a whole).

    offset 0  4 bytes  magic b"IOTC"
    offset 4  1 byte   codec version (currently 1)
    offset 5  1 byte   flags: bit 0 = payload is one lz4 frame, bit 1 = floating tensors are int8-quantised

Payloads come from untrusted peers, so `decode_tensors` checks everything against a caller-given spec
and raises `CodecError` with a readable reason. Nothing here ever unpickles.

int8 mode quantises each floating tensor (with at least one dimension) symmetrically per row over its
last dim: q = round(x / s) with s = absmax(row) / 127, stored as int8 `name` plus float32 scales
`name` + SCALE_SUFFIX of shape (*x.shape[:-1], 1). The dequantisation error is at most
absmax(row) / 127 / 2 per element in float32 (plus float32 rounding); the cast to a narrower spec
dtype (bfloat16, float16) adds that dtype's own rounding on top. Integer tensors are never quantised.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass

import lz4.frame
import torch
from safetensors import SafetensorError, deserialize
from safetensors.torch import save

MAGIC = b"IOTC"
VERSION = 2
METADATA_KEY = "iota"
FLAG_LZ4 = 0b01
FLAG_INT8 = 0b10
_HEADER = struct.Struct("<4sBB")
SCALE_SUFFIX = ".__int8_scale"
SINGLE_NAME = "tensor"
# Far above any healthy activation, gradient or weight, yet catches blow-ups long before fp16 overflow.
DEFAULT_MAX_ABS = 1e6

# Our dtype names, their torch dtypes and safetensors tags. Anything else is refused on the wire.
_DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float64": (torch.float64, "F64"),
    "float32": (torch.float32, "F32"),
    "float16": (torch.float16, "F16"),
    "bfloat16": (torch.bfloat16, "BF16"),
    "int64": (torch.int64, "I64"),
    "int32": (torch.int32, "I32"),
    "int16": (torch.int16, "I16"),
    "int8": (torch.int8, "I8"),
    "uint8": (torch.uint8, "U8"),
    "bool": (torch.bool, "BOOL"),
}
_NAME_OF_TAG = {tag: name for name, (_, tag) in _DTYPES.items()}
_NAME_OF_TORCH = {dtype: name for name, (dtype, _) in _DTYPES.items()}


class CodecError(ValueError):
    """A payload (or a tensor given to encode) breaks the wire contract."""


@dataclass(frozen=True)
class TensorSpec:
    """What the receiver expects: exact dtype, and shape where None means any size for that dim."""

    shape: tuple[int | None, ...]
    dtype: str

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"unsupported dtype {self.dtype!r}; choose from {sorted(_DTYPES)}")
        if any(d is not None and (not isinstance(d, int) or d < 0) for d in self.shape):
            raise ValueError(f"shape {self.shape} must hold non-negative ints or None")

    @property
    def quantisable(self) -> bool:
        # Sender and receiver both derive "is this int8 on the wire" from dtype and rank alone.
        return _DTYPES[self.dtype][0].is_floating_point and len(self.shape) >= 1


def content_hash(data: bytes) -> str:
    """sha256 hex digest, used to check that an uploaded object is the one that was announced."""
    return hashlib.sha256(data).hexdigest()


def encode_tensors(tensors: dict[str, torch.Tensor], *, int8: bool = False, compress: bool = False) -> bytes:
    """Serialise named tensors to the wire format (CPU, contiguous, safetensors, optional int8/lz4)."""
    stored: dict[str, torch.Tensor] = {}
    original_dtypes: dict[str, str] = {}
    seen_storages: set[int] = set()
    for name, tensor in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            raise CodecError(f"tensor name {name!r} ends with the reserved suffix {SCALE_SUFFIX!r}")
        if tensor.dtype not in _NAME_OF_TORCH:
            raise CodecError(f"tensor {name!r} has unsupported dtype {tensor.dtype}")
        t = tensor.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share storage; copy only in that rare case.
        if t.untyped_storage().data_ptr() in seen_storages:
            t = t.clone()
        seen_storages.add(t.untyped_storage().data_ptr())
        if int8 and t.is_floating_point() and t.dim() >= 1:
            stored[name], stored[name + SCALE_SUFFIX] = _quantise(name, t)
            original_dtypes[name] = _NAME_OF_TORCH[t.dtype]
        else:
            stored[name] = t
    # One metadata entry: safetensors writes its metadata map in an order that varies between processes,
    # and the same tensors must always give the same bytes (reducers compare results by hash).
    meta: dict[str, object] = {"codec": VERSION, "int8": int(int8)}
    if original_dtypes:
        meta["dtypes"] = original_dtypes
    payload = save(stored, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
    flags = (FLAG_LZ4 if compress else 0) | (FLAG_INT8 if int8 else 0)
    if compress:
        payload = lz4.frame.compress(payload)
    return _HEADER.pack(MAGIC, VERSION, flags) + payload


def encode_tensor(tensor: torch.Tensor, *, int8: bool = False, compress: bool = False) -> bytes:
    return encode_tensors({SINGLE_NAME: tensor}, int8=int8, compress=compress)


def decode_tensors(
    data: bytes, spec: dict[str, TensorSpec], *, max_bytes: int, max_abs: float | None = DEFAULT_MAX_ABS
) -> dict[str, torch.Tensor]:
    """Parse and validate a wire payload against `spec`; raises CodecError on any deviation.

    `max_bytes` bounds the payload both as received and after lz4; int8 tensors dequantise to the spec
    dtype, so the decoded tensors can be up to 8x that. `max_abs` bounds floating values (None: off).
    """
    if len(data) > max_bytes:
        raise CodecError(f"payload is {len(data)} bytes, limit is {max_bytes}")
    flags = _check_header(data)
    payload = bytes(data[_HEADER.size :])
    if flags & FLAG_LZ4:
        payload = _decompress(payload, max_bytes)
    int8 = bool(flags & FLAG_INT8)
    original_dtypes = _check_metadata(payload, int8)
    raw = _deserialize(payload)
    _check_names(raw, spec, int8)
    out: dict[str, torch.Tensor] = {}
    for name, s in spec.items():
        if int8 and s.quantisable:
            recorded = original_dtypes.get(name, "unrecorded")
            if recorded != s.dtype:
                raise CodecError(f"tensor {name!r} has dtype {recorded}, expected {s.dtype}")
            q = _to_tensor(name, raw[name], "int8")
            _check_shape(name, q, s)
            scale = _to_tensor(name + SCALE_SUFFIX, raw[name + SCALE_SUFFIX], "float32")
            _check_scale(name, scale, q)
            t = (q.to(torch.float32) * scale).to(_DTYPES[s.dtype][0])
        else:
            t = _to_tensor(name, raw[name], s.dtype)
            _check_shape(name, t, s)
        _check_values(name, t, max_abs)
        out[name] = t
    return out


def decode_tensor(
    data: bytes, spec: TensorSpec, *, max_bytes: int, max_abs: float | None = DEFAULT_MAX_ABS
) -> torch.Tensor:
    return decode_tensors(data, {SINGLE_NAME: spec}, max_bytes=max_bytes, max_abs=max_abs)[SINGLE_NAME]


def _quantise(name: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = t.to(torch.float32)
    if not torch.isfinite(x).all():
        raise CodecError(f"cannot int8-quantise tensor {name!r}: it contains NaN or Inf")
    if x.shape[-1] == 0:  # amax over an empty dim is undefined; such rows carry no data anyway
        return x.to(torch.int8), torch.zeros(*x.shape[:-1], 1)
    scale = x.abs().amax(dim=-1, keepdim=True) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero rows quantise to 0
    q = torch.round(x / safe).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _check_header(data: bytes) -> int:
    if len(data) < _HEADER.size:
        raise CodecError(f"payload is {len(data)} bytes, too short for the {_HEADER.size}-byte header")
    magic, version, flags = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CodecError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise CodecError(f"unsupported codec version {version}, expected {VERSION}")
    if flags & ~(FLAG_LZ4 | FLAG_INT8):
        raise CodecError(f"unknown flags 0x{flags:02x}")
    return flags


def _decompress(payload: bytes, max_bytes: int) -> bytes:
    decompressor = lz4.frame.LZ4FrameDecompressor()
    try:
        # max_length bounds the output, so a decompression bomb stops at the limit.
        out = decompressor.decompress(payload, max_length=max_bytes)
    except RuntimeError as e:
        raise CodecError(f"malformed lz4 frame: {e}") from e
    if not decompressor.eof:
        if len(out) >= max_bytes:
            raise CodecError(f"decompressed payload exceeds limit of {max_bytes} bytes")
        raise CodecError("malformed lz4 frame: truncated")
    if decompressor.unused_data:
        raise CodecError(f"malformed lz4 frame: {len(decompressor.unused_data)} trailing bytes")
    return out


def _check_metadata(payload: bytes, int8: bool) -> dict[str, str]:
    """Read safetensors' `__metadata__`, which its Python API does not expose for in-memory bytes."""
    try:
        (header_len,) = struct.unpack_from("<Q", payload)
        if header_len > len(payload) - 8:
            raise ValueError(f"header length {header_len} exceeds the {len(payload)}-byte buffer")
        header = json.loads(payload[8 : 8 + header_len])
        metadata = header.get("__metadata__", {}) if isinstance(header, dict) else None
        if not isinstance(metadata, dict):
            raise ValueError("header is not a JSON object with an object __metadata__")
        meta = json.loads(metadata.get(METADATA_KEY, "null")) if set(metadata) == {METADATA_KEY} else None
        if not isinstance(meta, dict) or meta.get("codec") != VERSION or meta.get("int8") != int(int8):
            raise ValueError(f"codec metadata {metadata} disagrees with the wire header")
        dtypes = meta.get("dtypes", {})
        if not isinstance(dtypes, dict) or not all(isinstance(v, str) for v in dtypes.values()):
            raise ValueError("the metadata's dtypes are not a JSON object of strings")
    except (struct.error, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CodecError(f"malformed safetensors payload: {e}") from e
    return dtypes


def _deserialize(payload: bytes) -> dict[str, dict]:
    try:
        # Returns raw bytes per tensor; we build torch tensors ourselves only for dtypes we accept.
        return dict(deserialize(payload))
    except SafetensorError as e:
        raise CodecError(f"malformed safetensors payload: {e}") from e


def _check_names(raw: dict[str, dict], spec: dict[str, TensorSpec], int8: bool) -> None:
    expected: set[str] = set()
    for name, s in spec.items():
        expected.add(name)
        if int8 and s.quantisable:
            expected.add(name + SCALE_SUFFIX)
    missing, extra = sorted(expected - raw.keys()), sorted(raw.keys() - expected)
    if missing:
        raise CodecError(", ".join(f"missing tensor {n!r}" for n in missing))
    if extra:
        raise CodecError(", ".join(f"unexpected tensor {n!r}" for n in extra))


def _to_tensor(name: str, view: dict, dtype: str) -> torch.Tensor:
    tag = view["dtype"]
    if tag != _DTYPES[dtype][1]:
        raise CodecError(f"tensor {name!r} has dtype {_NAME_OF_TAG.get(tag, tag)}, expected {dtype}")
    torch_dtype = _DTYPES[dtype][0]
    shape = list(view["shape"])
    if len(view["data"]) == 0:  # frombuffer rejects empty buffers
        return torch.empty(shape, dtype=torch_dtype)
    # safetensors hands us a fresh bytearray per tensor, so the tensor owns writable memory.
    return torch.frombuffer(view["data"], dtype=torch_dtype).reshape(shape)


def _check_shape(name: str, t: torch.Tensor, spec: TensorSpec) -> None:
    shape = tuple(t.shape)
    if len(shape) != len(spec.shape) or any(
        e is not None and e != a for a, e in zip(shape, spec.shape, strict=True)
    ):
        raise CodecError(f"tensor {name!r} has shape {_fmt(shape)}, expected {_fmt(spec.shape)}")


def _fmt(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("*" if d is None else str(d) for d in shape) + ")"


def _check_scale(name: str, scale: torch.Tensor, q: torch.Tensor) -> None:
    expected = (*q.shape[:-1], 1)
    if tuple(scale.shape) != expected:
        raise CodecError(f"int8 scale of {name!r} has shape {tuple(scale.shape)}, expected {expected}")
    if not torch.isfinite(scale).all() or (scale < 0).any():
        raise CodecError(f"int8 scale of {name!r} must be finite and non-negative")


def _check_values(name: str, t: torch.Tensor, max_abs: float | None) -> None:
    # Integer tensors are ids and indices: their valid range is the caller's business, not ours.
    if not t.is_floating_point() or t.numel() == 0:
        return
    if not torch.isfinite(t).all():
        raise CodecError(f"tensor {name!r} contains NaN or Inf")
    if max_abs is not None:
        magnitude = t.abs().max().item()
        if magnitude > max_abs:
            raise CodecError(f"tensor {name!r} has magnitude {magnitude:g} above limit {max_abs:g}")
