"""A made-up service account with a real RSA key, so V4 signed URLs can be checked against its public half."""
from __future__ import annotations

import hashlib
import json
import pathlib
import urllib.parse

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

SIGNER = "exporter@test-project.iam.gserviceaccount.com"


def new_private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def key_file_info(private_key: rsa.RSAPrivateKey) -> dict[str, str]:
    """The JSON of a downloaded service-account key file."""
    pem = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
    return {"type": "service_account", "project_id": "test-project", "private_key_id": "test-key",
            "private_key": pem, "client_email": SIGNER, "client_id": "1",
            "token_uri": "https://oauth2.googleapis.com/token"}


def write_key_file(path: pathlib.Path, private_key: rsa.RSAPrivateKey) -> pathlib.Path:
    path.write_text(json.dumps(key_file_info(private_key)))
    return path


def verify_v4_url(url: str, public_key: rsa.RSAPublicKey) -> dict[str, str]:
    """Check a V4 signed GET URL as GCS would (GOOG4-RSA-SHA256 over the canonical request); return
    its query parameters. Written from the GCS documentation, not from the library's code."""
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    signature = bytes.fromhex(query.pop("X-Goog-Signature"))
    assert query["X-Goog-Algorithm"] == "GOOG4-RSA-SHA256"
    assert query["X-Goog-SignedHeaders"] == "host"
    canonical_query = "&".join(f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
                               for k, v in sorted(query.items()))
    canonical_request = "\n".join(["GET", parts.path, canonical_query, f"host:{parts.netloc}\n", "host",
                                   "UNSIGNED-PAYLOAD"])
    scope = query["X-Goog-Credential"].split("/", 1)[1]
    string_to_sign = "\n".join(["GOOG4-RSA-SHA256", query["X-Goog-Date"], scope,
                                hashlib.sha256(canonical_request.encode()).hexdigest()])
    public_key.verify(signature, string_to_sign.encode(), padding.PKCS1v15(), hashes.SHA256())  # raises if bad
    return query
