"""Wire primitives every message is built from: the version headers, checked hashes and numbers, the
strict base model, the objects in the bucket, and the bodies every route shares (session, ack, error).

Units: sizes in bytes, times in seconds, sample ids as in `common.data`.
"""

from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema

PROTOCOL_VERSION = 1
# Sent on every request and response. A client whose version differs from the server's gets 426 and a
# reason; a server answers with its own version and run id so that clients can tell what they talk to.
HEADER_PROTOCOL = "Iota-Protocol"
HEADER_RUN = "Iota-Run"

MAX_REASON_CHARS = 500
MAX_LOSS = 100.0  # A per-token cross-entropy above this is a lie or a broken model; ln(128256) is 11.8.
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _sha256_hex(value: str) -> str:
    if not _SHA256_HEX.fullmatch(value):
        raise ValueError("must be a lowercase hex sha256 digest (64 characters)")
    return value


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be finite")
    return value


# The schema states what the validators check, so that a client (or a fuzzer) that follows it is accepted.
Sha256Hex = Annotated[
    str, AfterValidator(_sha256_hex), WithJsonSchema({"type": "string", "pattern": "^[0-9a-f]{64}$"})
]
FiniteFloat = Annotated[float, AfterValidator(_finite)]


class _Message(BaseModel):
    # Unknown fields are refused, so a typo or a field from another version fails loudly.
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------------------
# Objects in the bucket


class ArtifactRef(_Message):
    """An uploaded object as its producer announced it: the orchestrator checks all three before accepting."""

    key: str = Field(min_length=1, max_length=512)
    size: int = Field(ge=1)
    sha256: Sha256Hex


class UploadTarget(_Message):
    """A presigned PUT for exactly one key, chosen by the orchestrator under the caller's own prefix."""

    key: str
    url: str
    expires_in_s: int


class DownloadSource(_Message):
    """A presigned GET plus what the downloaded bytes must be; the receiver checks size and hash."""

    key: str
    url: str
    size: int
    sha256: str


class SessionRequest(_Message):
    """Fields every request after registration carries."""

    run_id: str = Field(max_length=64)
    session: int = Field(ge=0)


class Ack(_Message):
    ok: bool = True


class ErrorBody(_Message):
    """The body of every 4xx/5xx: a stable machine-readable code and a reason for humans."""

    code: str
    detail: str
