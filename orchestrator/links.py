"""Presigned URLs on the run's bucket in the protocol's forms: what a work item, a merge task and a replay
task hand out (`stage_merge.Links` is the part a merge needs)."""

from __future__ import annotations

from common.protocol import ArtifactRef, DownloadSource, UploadTarget
from common.storage import ObjectStore


class StoreLinks:
    def __init__(self, store: ObjectStore, *, upload_expires_s: int) -> None:
        self.store, self.upload_expires_s = store, upload_expires_s

    def upload_target(self, key: str) -> UploadTarget:
        expiry = self.upload_expires_s
        return UploadTarget(key=key, url=self.store.presign_put(key, expires_s=expiry), expires_in_s=expiry)

    def download_source(self, ref: ArtifactRef) -> DownloadSource:
        return DownloadSource(
            key=ref.key, url=self.store.presign_get(ref.key), size=ref.size, sha256=ref.sha256
        )


__all__ = ["StoreLinks"]
