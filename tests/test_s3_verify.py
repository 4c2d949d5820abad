"""Presigned URLs are scoped to one key, one method and a lifetime: shown against nanio (`NanioS3`), an S3
server that verifies SigV4 as S3 does, where moto (`EmbeddedS3`) checks nothing.

The orchestrator hands miners presigned URLs and nothing else; a miner must not be able to turn its upload
URL into a read, a delete or a write elsewhere, nor use a URL past its life. These tests make exactly those
requests and expect S3's 403; each refusal has a control (the right use of the same kind of URL) that
succeeds. The project's storage layer (`ObjectStore`, multipart both ways) and one whole network run work
against the same server.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from common.s3server import ExternalS3, NanioS3
from common.storage import ObjectStore, StorageError, download_from_url, upload_multipart, upload_to_url
from iota.cli import app
from iota.devnet import Devnet, DevnetOptions

MIB = 2**20
BODY = b"the activation of one item"


@pytest.fixture(scope="module")
def nanio() -> Iterator[NanioS3]:
    with NanioS3() as server:
        yield server


@pytest.fixture(scope="module")
def store(nanio: NanioS3) -> ObjectStore:
    store = ObjectStore.from_settings(nanio.settings(bucket="verify"))
    store.ensure_bucket()
    return store


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10.0) as client:
        yield client


def other_key(url: str, key: str) -> str:
    """The same presigned URL (signature and all) aimed at another object key."""
    parts = urlsplit(url)
    bucket = parts.path.split("/")[1]
    return urlunsplit(parts._replace(path=f"/{bucket}/{key}"))


def with_param(url: str, name: str, value: str) -> str:
    """The URL with one query parameter changed."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query[name] = value
    return urlunsplit(parts._replace(query=urlencode(query)))


def test_a_presigned_put_writes_its_own_key_and_nothing_else(store: ObjectStore, http: httpx.Client) -> None:
    url = store.presign_put("runs/r/miner/item-1")
    store.put_bytes("runs/r/miner/item-2", b"someone else's")

    assert http.put(other_key(url, "runs/r/miner/item-2"), content=b"forged").status_code == 403
    assert store.get_bytes("runs/r/miner/item-2", max_bytes=MIB) == b"someone else's"
    # A PUT signature read, deleted or probed with: the other methods are not what was signed.
    for method in ("GET", "HEAD", "DELETE"):
        assert http.request(method, url).status_code == 403, method
    assert store.head("runs/r/miner/item-2") is not None

    upload_to_url(url, BODY, client=http)  # the control: the URL does what it was issued for
    assert store.get_bytes("runs/r/miner/item-1", max_bytes=MIB) == BODY


def test_a_presigned_get_reads_its_own_key_and_writes_nothing(store: ObjectStore, http: httpx.Client) -> None:
    store.put_bytes("runs/r/miner/readable", BODY)
    store.put_bytes("runs/r/miner/secret", b"not for this reader")
    url = store.presign_get("runs/r/miner/readable")

    assert http.get(other_key(url, "runs/r/miner/secret")).status_code == 403
    assert http.put(url, content=b"overwritten").status_code == 403
    assert http.delete(url).status_code == 403
    assert http.head(url).status_code == 403  # HEAD is a method of its own in SigV4

    assert download_from_url(url, max_bytes=MIB, client=http) == BODY  # unchanged, and the control


def test_a_tampered_signature_or_lifetime_is_refused(store: ObjectStore, http: httpx.Client) -> None:
    store.put_bytes("runs/r/miner/tamper", BODY)
    url = store.presign_get("runs/r/miner/tamper")
    signature = dict(parse_qsl(urlsplit(url).query))["X-Amz-Signature"]
    flipped = ("0" if signature[0] != "0" else "1") + signature[1:]

    assert http.get(with_param(url, "X-Amz-Signature", flipped)).status_code == 403
    assert http.get(with_param(url, "X-Amz-Expires", "604800")).status_code == 403  # a longer life
    credential = dict(parse_qsl(urlsplit(url).query))["X-Amz-Credential"]
    someone_else = "someone-else/" + credential.split("/", 1)[1]
    assert http.get(with_param(url, "X-Amz-Credential", someone_else)).status_code == 403
    assert http.get(urlunsplit(urlsplit(url)._replace(query=""))).status_code == 403  # no signature at all
    assert http.get(url).status_code == 200


def test_an_expired_presigned_url_is_refused_and_a_fresh_one_is_not(
    store: ObjectStore, http: httpx.Client
) -> None:
    store.put_bytes("runs/r/miner/old", BODY)
    put = store.presign_put("runs/r/miner/old", expires_s=1)
    get = store.presign_get("runs/r/miner/old", expires_s=1)
    # X-Amz-Date has whole seconds, so a 1 s URL is surely dead 2 s after it was signed.
    time.sleep(2.1)

    assert http.put(put, content=b"late").status_code == 403
    assert http.get(get).status_code == 403
    fresh = store.presign_get("runs/r/miner/old", expires_s=1)
    assert download_from_url(fresh, max_bytes=MIB, client=http) == BODY  # the old bytes: the PUT did nothing


def test_credentials_other_than_the_stores_are_refused(nanio: NanioS3) -> None:
    wrong = nanio.settings(bucket="verify").model_copy(update={"secret_access_key": SecretStr("not-it")})
    with pytest.raises(StorageError) as refused:
        ObjectStore.from_settings(wrong, attempts=1).put_bytes("runs/r/intruder", b"x")
    assert refused.value.status == 403


def test_the_object_store_round_trips_on_a_verifying_server(store: ObjectStore) -> None:
    """What the orchestrator does with its credentials (header-signed requests, boto3's own multipart
    above 16 MiB) works when every signature is checked."""
    store.ensure_bucket()  # again: the bucket exists now
    small, large = os.urandom(64 * 1024), os.urandom(16 * MIB + 1)
    store.put_bytes("runs/r/checkpoints/s0/v1/weights.iotc", large)
    store.put_bytes("runs/r/checkpoints/manifest.json", small)

    info = store.head("runs/r/checkpoints/s0/v1/weights.iotc")
    assert info is not None and info.size == len(large) and info.etag.endswith("-2")  # two parts
    assert store.get_bytes("runs/r/checkpoints/s0/v1/weights.iotc", max_bytes=len(large)) == large
    assert sorted(store.list_keys("runs/r/checkpoints/")) == [
        "runs/r/checkpoints/manifest.json",
        "runs/r/checkpoints/s0/v1/weights.iotc",
    ]
    store.delete(store.list_keys("runs/r/checkpoints/"))
    assert (
        store.list_keys("runs/r/checkpoints/") == []
        and store.head("runs/r/checkpoints/manifest.json") is None
    )


def test_a_miners_multipart_upload_through_part_urls(store: ObjectStore, http: httpx.Client) -> None:
    """The miners' multipart path: the orchestrator starts the upload and presigns one URL per part, the
    miner PUTs the slices, the orchestrator completes it; a part URL writes only its own part number."""
    key, part = "runs/r/miner/merge/e0.s0/pg.0", 5 * MIB  # S3's smallest part
    data = os.urandom(part + 1234)
    upload = store.create_multipart(key)
    urls = [store.presign_part(key, upload, n) for n in (1, 2)]

    assert http.put(with_param(urls[0], "partNumber", "2"), content=b"x").status_code == 403
    parts = upload_multipart(urls, data, part, client=http)
    store.complete_multipart(key, upload, parts)
    assert store.get_bytes(key, max_bytes=len(data)) == data

    aborted = store.create_multipart("runs/r/miner/merge/e0.s0/pg.1")
    store.abort_multipart("runs/r/miner/merge/e0.s0/pg.1", aborted)
    assert (
        http.put(store.presign_part("runs/r/miner/merge/e0.s0/pg.1", aborted, 1), content=b"x").status_code
        == 404
    )


def test_iota_devnet_takes_the_endpoint_from_the_flag_and_credentials_from_the_settings(
    nanio: NanioS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`iota devnet --s3-endpoint` with a secret the store refuses stops with the store's answer before it
    starts a single process (the working run is the network test below)."""
    monkeypatch.setenv("IOTA_S3_SECRET_ACCESS_KEY", "not-the-secret")
    args = ["devnet", "--s3-endpoint", nanio.endpoint_url, "--workdir", str(tmp_path), "--samples", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "cannot use the S3 store" in result.output and "403" in result.output
    assert not (tmp_path / "logs" / "orchestrator.log").exists()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_network_trains_and_merges_on_a_verifying_store(nanio: NanioS3, tmp_path: Path) -> None:
    """`iota devnet --s3-endpoint` on nanio: every activation, gradient, merge artifact and checkpoint moves
    through presigned URLs or credentials that nanio checks (only the orchestrator has the store's secret;
    the miners' default credentials would be refused), moto is never started, and none of the work is
    refused or lost; the exported model is read back from that store."""
    samples = 16
    options = DevnetOptions(
        batch_size=2, seq_len=32, workdir=tmp_path, merge_every=8, s3=nanio.settings(bucket="devnet"),
        extra_env={"IOTA_ORCH_MAX_SAMPLES": str(samples)},
    )  # fmt: skip
    with Devnet(options) as net:
        assert isinstance(net.s3, ExternalS3)
        net.launch(["honest"] * 3, threads=1, timeout_s=90)
        status = net.wait_for(
            lambda s: (
                s.samples_completed >= samples and s.merges_completed >= 3 and s.epoch_phase == "training"
            ),
            timeout_s=150,
        )
        assert status.attempts_failed == 0 and status.samples_dropped == 0
        exported = net.export_model(status.run_id)
    assert exported is not None and Path(exported).stat().st_size > 0
    keys = ObjectStore.from_settings(nanio.settings(bucket="devnet")).list_keys(f"runs/{status.run_id}/")
    assert any("/checkpoints/" in k for k in keys)
