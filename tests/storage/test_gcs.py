"""GcsStorage against a real fake-gcs-server; signed URLs verified here, since emulators ignore signatures."""
from __future__ import annotations

import base64
import datetime as dt
import json
import os
import types
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from google.cloud.storage import _signing
from google.oauth2 import credentials as oauth2_credentials
from google.oauth2 import service_account

from tests.gcs_emulator import GcsEmulator, gcs_emulator_fixture  # noqa: F401  (registers `gcs_emulator`)
from tests.service_account import SIGNER, key_file_info, new_private_key, verify_v4_url
from tests.storage.support import put
from userexport_server.errors import StorageError
from userexport_server.settings import Settings
from userexport_server.storage import ObjectExistsError, make_storage
from userexport_server.storage.gcs import SCOPES, GcsStorage

CHUNK = 256 * 1024  # the smallest resumable chunk, so a few MB take many requests


@pytest.fixture(scope="module")
def private_key() -> rsa.RSAPrivateKey:
    return new_private_key()


@pytest.fixture(scope="module")
def key_credentials(private_key: rsa.RSAPrivateKey) -> service_account.Credentials:
    """A service-account key like a downloaded JSON key file, for a made-up account."""
    # Self-signed JWT access tokens (AIP-4111): the emulator ignores them, and no token endpoint is needed.
    return service_account.Credentials.from_service_account_info(key_file_info(private_key), scopes=SCOPES,
                                                                 always_use_jwt_access=True)


@pytest.fixture
def gcs(gcs_emulator: GcsEmulator, key_credentials: service_account.Credentials) -> Iterator[GcsStorage]:
    storage = GcsStorage(gcs_emulator.bucket, endpoint=gcs_emulator.endpoint, credentials=key_credentials,
                         chunk_size=CHUNK)
    yield storage
    storage.close()


def download(url: str) -> tuple[dict[str, str], bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return dict(response.headers), response.read()


def upload_requests(emulator: GcsEmulator, key: str) -> list[str]:
    """The emulator's log lines for requests of the resumable session(s) of `key`."""
    name = urllib.parse.quote(key, safe="")
    return [line for line in emulator.request_log().splitlines() if f"name={name}" in line]


def test_streamed_upload_appears_only_on_commit(gcs: GcsStorage, gcs_emulator: GcsEmulator, key: str) -> None:
    data = os.urandom(5 * 1024 * 1024 + 12345)
    writer = gcs.open_writer(key, "acme.csv.gz")
    for start in range(0, len(data), 100_000):
        writer.write(data[start:start + 100_000])

    # Most of it is already in GCS's resumable session, yet no object exists.
    assert len([line for line in upload_requests(gcs_emulator, key) if '" 308 ' in line]) >= 19
    assert not gcs.exists(key)

    writer.commit()

    assert gcs.exists(key)
    blob = gcs._bucket.get_blob(key)
    assert (blob.size, blob.content_type) == (len(data), "application/gzip")
    assert blob.content_disposition == 'attachment; filename="acme.csv.gz"'
    assert blob.download_as_bytes() == data


def test_empty_file(gcs: GcsStorage, key: str) -> None:
    put(gcs, key, b"")
    assert gcs.exists(key) and gcs._bucket.get_blob(key).size == 0


def test_abort_cancels_the_upload(gcs: GcsStorage, gcs_emulator: GcsEmulator, key: str) -> None:
    writer = gcs.open_writer(key, "acme.csv.gz")
    writer.write(os.urandom(3 * CHUNK))
    writer.abort()
    writer.abort()

    assert not gcs.exists(key)
    deletes = [line for line in upload_requests(gcs_emulator, key) if '"DELETE /upload/' in line]
    assert len(deletes) == 1 and "upload_id=" in deletes[0]  # the session's URI, which cancels it


def test_abort_after_commit_keeps_the_object(gcs: GcsStorage, key: str) -> None:
    writer = gcs.open_writer(key, "acme.csv.gz")
    writer.write(b"whole")
    writer.commit()
    writer.abort()
    assert gcs.exists(key)


def test_uploads_only_ever_create(gcs: GcsStorage, gcs_emulator: GcsEmulator, key: str) -> None:
    put(gcs, key, b"data")
    starts = [line for line in gcs_emulator.request_log().splitlines()
              if "POST /upload/storage/v1/b/" in line and "uploadType=resumable" in line]
    assert starts and all("ifGenerationMatch=0" in line for line in starts)


@pytest.mark.xfail(strict=True, reason="fake-gcs-server v1.54 ignores preconditions of resumable uploads "
                                       "(fsouza/fake-gcs-server#1967, fixed by #2260); GCS enforces them")
def test_second_writer_fails_instead_of_overwriting(gcs: GcsStorage, key: str) -> None:
    first, second = gcs.open_writer(key, "acme.csv.gz"), gcs.open_writer(key, "acme.csv.gz")
    first.write(b"1" * (2 * CHUNK))
    second.write(b"2" * (2 * CHUNK))  # both sessions started before either object exists
    first.commit()
    with pytest.raises(ObjectExistsError):
        second.commit()


def test_upload_failure_is_a_clear_storage_error(gcs_emulator: GcsEmulator,
                                                 key_credentials: service_account.Credentials, key: str) -> None:
    storage = GcsStorage("no-such-bucket", endpoint=gcs_emulator.endpoint, credentials=key_credentials)
    writer = storage.open_writer(key, "acme.csv.gz")
    writer.write(b"data")
    with pytest.raises(StorageError, match=r"^Uploading the export file to Cloud Storage failed \(HTTP 404\).$"):
        writer.commit()
    writer.abort()
    storage.close()


def test_delete(gcs: GcsStorage, key: str) -> None:
    put(gcs, key, b"data")
    gcs.delete(key)
    gcs.delete(key)  # missing is fine
    assert not gcs.exists(key)


def test_bad_keys_are_rejected(gcs: GcsStorage) -> None:
    for call in (lambda: gcs.open_writer("acme/../x.gz", "x.gz"), lambda: gcs.sign_url("/abs", 60),
                 lambda: gcs.delete("a//b"), lambda: gcs.exists("..")):
        with pytest.raises(ValueError, match="invalid storage key"):
            call()
    with pytest.raises(ValueError, match="last segment"):
        gcs.open_writer("acme/job/acme.csv.gz", 'x"; evil=.gz')


def test_signed_url_with_a_key(gcs: GcsStorage, gcs_emulator: GcsEmulator, private_key: rsa.RSAPrivateKey,
                               key: str) -> None:
    data = os.urandom(100_000)
    put(gcs, key, data)
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)

    url, expires_at = gcs.sign_url(key, 60)

    assert url.startswith(f"{gcs_emulator.endpoint}/{gcs_emulator.bucket}/{key}?")
    query = verify_v4_url(url, private_key.public_key())
    assert query["X-Goog-Expires"] == "60"
    signed_at = dt.datetime.strptime(query["X-Goog-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    assert before <= signed_at <= before + dt.timedelta(seconds=2)
    assert signed_at + dt.timedelta(seconds=59) <= expires_at <= signed_at + dt.timedelta(seconds=60)
    assert query["X-Goog-Credential"] == f"{SIGNER}/{signed_at:%Y%m%d}/auto/storage/goog4_request"
    headers, body = download(url)
    assert body == data and headers["Content-Type"] == "application/gzip"


def test_signed_url_without_a_key_uses_iam_sign_blob(gcs_emulator: GcsEmulator, private_key: rsa.RSAPrivateKey,
                                                     monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    """Workload identity: no key, so the IAM signBlob API signs. Only that HTTP call is stubbed: it
    signs with the test key, as IAM would with the service account's Google-held key."""
    calls: list[dict[str, Any]] = []

    class SignBlob:
        def __call__(self, url: str, method: str, body: str, headers: dict[str, str]) -> Any:
            calls.append({"url": url, "method": method, "headers": headers})
            payload = base64.b64decode(json.loads(body)["payload"])
            signed = private_key.sign(payload, padding.PKCS1v15(), hashes.SHA256())
            data = json.dumps({"keyId": "k", "signedBlob": base64.b64encode(signed).decode()}).encode()
            return types.SimpleNamespace(status=200, data=data)

    monkeypatch.setattr(_signing, "requests", types.SimpleNamespace(Request=SignBlob))
    token_credentials = oauth2_credentials.Credentials(token="ya29.workload-token")  # holds no key
    storage = GcsStorage(gcs_emulator.bucket, endpoint=gcs_emulator.endpoint, credentials=token_credentials,
                         signer_email=SIGNER)
    try:
        put(storage, key, b"signed by IAM")
        url, _ = storage.sign_url(key, 60)
    finally:
        storage.close()

    assert calls == [{"url": f"https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/{SIGNER}"
                             ":signBlob?alt=json", "method": "POST",
                      "headers": {"Authorization": "Bearer ya29.workload-token",
                                  "Content-type": "application/json"}}]
    query = verify_v4_url(url, private_key.public_key())
    assert query["X-Goog-Credential"].startswith(f"{SIGNER}/")
    assert download(url)[1] == b"signed by IAM"


def test_anonymous_emulator_access_gives_plain_urls(gcs_emulator: GcsEmulator, key: str) -> None:
    storage = make_storage(Settings(storage="gcs", gcs_bucket=gcs_emulator.bucket, gcs_endpoint=gcs_emulator.endpoint))
    try:
        assert isinstance(storage, GcsStorage)
        put(storage, key, b"anonymous")
        url, expires_at = storage.sign_url(key, 60)
    finally:
        storage.close()
    assert url == f"{gcs_emulator.endpoint}/{gcs_emulator.bucket}/{key}"
    assert 59 <= (expires_at - dt.datetime.now(dt.UTC)).total_seconds() <= 60
    assert download(url)[1] == b"anonymous"


def test_make_storage_gcs_needs_a_bucket() -> None:
    with pytest.raises(ValueError, match="USEREXPORT_GCS_BUCKET"):
        make_storage(Settings(storage="gcs", gcs_endpoint="http://127.0.0.1:1"))

