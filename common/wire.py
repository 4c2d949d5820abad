"""A boundary tensor on the wire under a run's settings: what a miner uploads and what its peers and the
validators decode. One definition, so that a validator's replay encodes exactly as the miner did."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.codec import TensorSpec, decode_tensor, encode_tensor
from common.model import ModelConfig, boundary_payload_limit, boundary_shape
from common.protocol import TrainingSpec

WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class BoundaryWire:
    spec: TensorSpec  # the (batch, seq, bottleneck) shape in the wire dtype
    max_bytes: int  # the largest payload such a tensor can take: anything bigger is refused unread
    training: TrainingSpec

    @classmethod
    def of(cls, cfg: ModelConfig, batch_size: int, seq_len: int, training: TrainingSpec) -> BoundaryWire:
        spec = TensorSpec(boundary_shape(cfg, batch_size, seq_len), training.wire_dtype)
        return cls(spec, boundary_payload_limit(cfg, batch_size, seq_len), training)

    def encode(self, tensor: torch.Tensor) -> bytes:
        t = self.training
        return encode_tensor(tensor.to(WIRE_DTYPES[t.wire_dtype]), int8=t.wire_int8, compress=t.wire_compress)

    def decode(self, data: bytes) -> torch.Tensor:
        """The tensor in fp32; raises `CodecError` for anything that is not such a boundary tensor."""
        return decode_tensor(data, self.spec, max_bytes=self.max_bytes).float()
