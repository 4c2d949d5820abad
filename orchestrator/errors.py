"""The one error a request gets when the orchestrator's state refuses it; the app turns it into the
HTTP answer (an `ErrorBody` with this status and code)."""

from __future__ import annotations


class RequestRejected(Exception):
    """A request the state does not allow; `status` and `code` become the HTTP answer."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


__all__ = ["RequestRejected"]
