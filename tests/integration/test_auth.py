"""Tokens, scopes and keys on a real server: each bad token is UNAUTHENTICATED (never INTERNAL), each
missing scope PERMISSION_DENIED; JWKS keys from a file and from a URL served in the test, where a
malformed file stops startup naming its variable and a rotated key served at the URL is accepted
without a restart. (Token verification and its cache on their own: tests/test_auth.py.)"""
from __future__ import annotations

import http.server
import json
import pathlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.harness import ServerHandle, ServerProcess, new_tenant
from tests.integration.support import SECRET_CLAIMS, call_get, error_reason, hs256, sign_claims
from tests.polling import eventually
from userexport.v1 import users_export_pb2 as pb
from userexport.v1 import users_export_pb2_grpc as pb_grpc

UNAUTHENTICATED = {
    "no metadata": lambda s: None,
    "not bearer": lambda s: [("authorization", "Basic dXNlcjpwYXNz")],
    "bearer without token": lambda s: [("authorization", "Bearer ")],
    "garbage": lambda s: [("authorization", "Bearer not.a.jwt")],
    "wrong signature": lambda s: hs256(s, secret=b"another-secret-of-enough-length-123"),
    "wrong issuer": lambda s: hs256(s, iss="https://evil.example/"),
    "wrong audience": lambda s: hs256(s, aud="someone-else"),
    "expired": lambda s: hs256(s, exp=int(time.time()) - 3600, iat=int(time.time()) - 7200,
                               nbf=int(time.time()) - 7200),
    "not yet valid": lambda s: hs256(s, nbf=int(time.time()) + 3600),
    "no tenant claim": lambda s: hs256(s, tenant=None),
    "tenant claim with path characters": lambda s: hs256(s, tenant="../etc"),
    "no exp": lambda s: hs256(s, exp=None),
    "alg none": lambda s: [("authorization", "Bearer " + jwt.encode(
        {**SECRET_CLAIMS, "tenant": "acme", "exp": int(time.time()) + 60},
        None, algorithm="none"))],  # type: ignore[arg-type]
}


@pytest.mark.parametrize("case", UNAUTHENTICATED, ids=list(UNAUTHENTICATED))
def test_bad_tokens_are_unauthenticated(server: ServerHandle, case: str) -> None:
    error = call_get(server, UNAUTHENTICATED[case](server))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()
    assert error.details() and "Traceback" not in error.details()
    assert error_reason(error)


def test_small_clock_skew_is_tolerated(server: ServerHandle) -> None:
    error = call_get(server, hs256(server, nbf=int(time.time()) + 5))
    assert error.code() == grpc.StatusCode.NOT_FOUND  # authenticated; the job just does not exist


SCOPES = [
    # (scopes in the token, rpc, allowed)
    ("read:users", "create", True), ("create:users", "create", False), ("", "create", False),
    ("read:users", "cancel", True), ("create:users", "cancel", False),
    ("read:users", "get", True), ("create:users", "get", True), ("update:users", "get", False),
    ("create:users", "list", True), ("delete:users", "list", False),
    ("create:users", "watch", True), ("", "watch", False),
]


@pytest.mark.parametrize(("scopes", "rpc", "allowed"), SCOPES)
def test_scope_rules(server: ServerHandle, scopes: str, rpc: str, allowed: bool) -> None:
    tenant = new_tenant()
    server.seed(2, tenant=tenant)
    stub = pb_grpc.UsersExportServiceStub(grpc.insecure_channel(server.target))
    metadata = server.metadata(tenant, scopes.split())
    pending = "job_" + "B" * 16
    calls = {
        "create": lambda: stub.CreateUsersExportJob(pb.ExportRequest(format=pb.ExportRequest.CSV), metadata=metadata),
        "cancel": lambda: stub.CancelJob(pb.CancelJobRequest(id=pending), metadata=metadata),
        "get": lambda: stub.GetJob(pb.GetJobRequest(id=pending), metadata=metadata),
        "list": lambda: stub.ListJobs(pb.ListJobsRequest(), metadata=metadata),
        "watch": lambda: list(stub.WatchJob(pb.WatchJobRequest(id=pending), metadata=metadata)),
    }
    try:
        calls[rpc]()
        code = grpc.StatusCode.OK
    except grpc.RpcError as error:
        code = error.code()
        if code == grpc.StatusCode.PERMISSION_DENIED:
            assert error.details() == "Insufficient scope; expected any of: read:users." or \
                error.details() == "Insufficient scope; expected any of: read:users, create:users."
            assert error_reason(error) == "INSUFFICIENT_SCOPE"
    if allowed:
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND)
    else:
        assert code == grpc.StatusCode.PERMISSION_DENIED


def test_permissions_claim_also_grants_scopes(server: ServerHandle) -> None:
    error = call_get(server, hs256(server, scope=None, permissions=["read:users"]))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_health_needs_no_token(server: ServerHandle) -> None:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.target))
    assert stub.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    response = stub.Check(health_pb2.HealthCheckRequest(service="userexport.v1.UsersExportService"))
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_jwks_rs256_and_es256(make_server, tmp_path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    jwks = {"keys": [
        {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key())), "kid": "rsa1", "use": "sig"},
        {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key())), "kid": "ec1", "use": "sig"},
    ]}
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    server = make_server(jwt_jwks_file=str(path), jwt_issuer="https://issuer.example/", jwt_audience="exports",
                         jwt_tenant_claim="https://example.com/tenant")
    now = int(time.time())
    claims = {"iss": "https://issuer.example/", "aud": "exports", "https://example.com/tenant": "acme",
              "scope": "read:users", "exp": now + 60}
    stub = pb_grpc.UsersExportServiceStub(grpc.insecure_channel(server.target))

    def code_for(token: str) -> grpc.StatusCode:
        try:
            stub.ListJobs(pb.ListJobsRequest(), metadata=[("authorization", f"Bearer {token}")])
            return grpc.StatusCode.OK
        except grpc.RpcError as error:
            return error.code()

    assert code_for(jwt.encode(claims, rsa_key, algorithm="RS256", headers={"kid": "rsa1"})) == grpc.StatusCode.OK
    assert code_for(jwt.encode(claims, ec_key, algorithm="ES256", headers={"kid": "ec1"})) == grpc.StatusCode.OK
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert code_for(jwt.encode(claims, other, algorithm="RS256", headers={"kid": "rsa1"})) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert code_for(jwt.encode(claims, rsa_key, algorithm="RS256", headers={"kid": "nope"})) == \
        grpc.StatusCode.UNAUTHENTICATED
    # No HS256 token is accepted once only a JWKS is configured (no algorithm confusion).
    assert code_for(jwt.encode(claims, b"x" * 32, algorithm="HS256")) == grpc.StatusCode.UNAUTHENTICATED


ISSUER, AUDIENCE = "https://issuer.example/", "exports"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def jwk(private: Any, kid: str) -> dict[str, Any]:
    to_jwk = jwt.algorithms.RSAAlgorithm.to_jwk if isinstance(private, rsa.RSAPrivateKey) \
        else jwt.algorithms.ECAlgorithm.to_jwk
    return {**json.loads(to_jwk(private.public_key())), "kid": kid, "use": "sig"}


def token(private: Any, algorithm: str, kid: str | None, **claims: Any) -> str:
    body = {"iss": ISSUER, "aud": AUDIENCE, "tenant": "acme", "scope": "read:users", "exp": int(time.time()) + 60,
            **claims}
    return sign_claims(body, private, algorithm, headers={"kid": kid} if kid else None)


def outcome(server: ServerHandle, bearer: str) -> tuple[grpc.StatusCode, str | None]:
    stub = pb_grpc.UsersExportServiceStub(grpc.insecure_channel(server.target))
    try:
        stub.ListJobs(pb.ListJobsRequest(), metadata=[("authorization", f"Bearer {bearer}")], timeout=20)
        return grpc.StatusCode.OK, None
    except grpc.RpcError as error:
        return error.code(), error_reason(error)


@pytest.fixture
def file_server(make_server: Callable[..., ServerHandle], tmp_path: pathlib.Path) -> ServerHandle:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk(RSA_KEY, "rsa1"), jwk(EC_KEY, "ec1")]}))
    return make_server(jwt_jwks_file=str(path), jwt_issuer=ISSUER, jwt_audience=AUDIENCE, workers=0)


BAD_TOKENS: dict[str, tuple[Callable[[], str], str]] = {
    # case: (token, the ErrorInfo reason)
    "RS256 header naming an EC key": (lambda: token(RSA_KEY, "RS256", "ec1"), "BAD_ALGORITHM"),
    "ES256 header naming an RSA key": (lambda: token(EC_KEY, "ES256", "rsa1"), "BAD_ALGORITHM"),
    "no kid with several keys": (lambda: token(RSA_KEY, "RS256", None), "UNKNOWN_KEY"),
    "unknown kid": (lambda: token(RSA_KEY, "RS256", "rsa9"), "UNKNOWN_KEY"),
    "exp as a string": (lambda: token(RSA_KEY, "RS256", "rsa1", exp=str(int(time.time()) + 60)), "INVALID_TOKEN"),
    "exp as a list": (lambda: token(RSA_KEY, "RS256", "rsa1", exp=[1]), "INVALID_TOKEN"),
    "aud as a number": (lambda: token(RSA_KEY, "RS256", "rsa1", aud=5), "WRONG_AUDIENCE"),
    "iss as a list": (lambda: token(RSA_KEY, "RS256", "rsa1", iss=[ISSUER]), "WRONG_ISSUER"),
}


def test_good_rs256_and_es256_tokens_are_accepted(file_server: ServerHandle) -> None:
    assert outcome(file_server, token(RSA_KEY, "RS256", "rsa1"))[0] == grpc.StatusCode.OK
    assert outcome(file_server, token(EC_KEY, "ES256", "ec1"))[0] == grpc.StatusCode.OK


@pytest.mark.parametrize("case", BAD_TOKENS, ids=list(BAD_TOKENS))
def test_each_bad_key_or_claim_is_unauthenticated(file_server: ServerHandle, case: str) -> None:
    """Before: a key of the wrong type for the alg escaped as INTERNAL."""
    make, reason = BAD_TOKENS[case]
    assert outcome(file_server, make()) == (grpc.StatusCode.UNAUTHENTICATED, reason)


def test_a_server_with_a_malformed_jwks_file_does_not_start(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text("{")
    with pytest.raises(RuntimeError, match="USEREXPORT_JWT_JWKS_FILE"):
        ServerProcess(tmp_path / "data", env={"USEREXPORT_JWT_JWKS_FILE": str(path)})


class JwksEndpoint:
    """A JWKS served over HTTP on loopback; `body` can be changed (key rotation) and fetches are counted."""

    def __init__(self) -> None:
        self.body = b"{}"
        self.fetches = 0
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                endpoint.fetches += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(endpoint.body)))
                self.end_headers()
                self.wfile.write(endpoint.body)

            def log_message(self, *args: object) -> None:
                pass

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)

    def publish(self, *keys: dict[str, Any]) -> None:
        self.body = json.dumps({"keys": list(keys)}).encode()


@pytest.fixture
def endpoint() -> Iterator[JwksEndpoint]:
    served = JwksEndpoint()
    served.thread.start()
    yield served
    served.http.shutdown()
    served.http.server_close()


COOLDOWN = 0.5


@pytest.fixture
def url_server(make_server: Callable[..., ServerHandle], endpoint: JwksEndpoint) -> ServerHandle:
    return make_server(jwt_jwks_url=endpoint.url, jwt_jwks_refresh_cooldown_seconds=COOLDOWN, jwt_issuer=ISSUER,
                       jwt_audience=AUDIENCE, workers=0)


def test_a_rotated_key_at_the_url_is_accepted_without_a_restart(url_server: ServerHandle,
                                                                 endpoint: JwksEndpoint) -> None:
    endpoint.publish(jwk(RSA_KEY, "k1"))
    assert outcome(url_server, token(RSA_KEY, "RS256", "k1"))[0] == grpc.StatusCode.OK
    rotated = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    endpoint.publish(jwk(rotated, "k2"))

    def accepted() -> bool:
        result = outcome(url_server, token(rotated, "RS256", "k2"))
        if result[0] != grpc.StatusCode.OK:
            assert result == (grpc.StatusCode.UNAUTHENTICATED, "UNKNOWN_KEY")  # until the cooldown allows a fetch
        return result[0] == grpc.StatusCode.OK

    eventually(accepted, "the rotated key being fetched", timeout=10, every=0.1)
    # The old key is gone from the set: its tokens are refused now.
    assert outcome(url_server, token(RSA_KEY, "RS256", "k1")) == (grpc.StatusCode.UNAUTHENTICATED, "UNKNOWN_KEY")


def test_made_up_kids_refetch_the_set_at_a_bounded_rate(url_server: ServerHandle, endpoint: JwksEndpoint) -> None:
    endpoint.publish(jwk(RSA_KEY, "k1"))
    started = time.monotonic()
    for i in range(40):
        assert outcome(url_server, token(RSA_KEY, "RS256", f"made-up-{i}"))[0] == grpc.StatusCode.UNAUTHENTICATED
    elapsed = time.monotonic() - started
    assert endpoint.fetches <= 2 + elapsed / COOLDOWN, (endpoint.fetches, elapsed)


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"keys": 5}', b'{"keys": [{"kty": "EC"}]}'],
                         ids=["not JSON", "a list", "keys a number", "EC key without a curve"])
def test_a_malformed_jwks_at_the_url_is_unauthenticated(url_server: ServerHandle, endpoint: JwksEndpoint,
                                                        body: bytes) -> None:
    endpoint.body = body
    assert outcome(url_server, token(RSA_KEY, "RS256", "k1")) == (grpc.StatusCode.UNAUTHENTICATED,
                                                                  "KEYS_UNAVAILABLE")


def test_an_unreachable_jwks_url_is_unauthenticated(make_server: Callable[..., ServerHandle]) -> None:
    server = make_server(jwt_jwks_url="http://127.0.0.1:9/jwks.json", jwt_issuer=ISSUER, jwt_audience=AUDIENCE,
                         workers=0)
    assert outcome(server, token(RSA_KEY, "RS256", "k1")) == (grpc.StatusCode.UNAUTHENTICATED, "KEYS_UNAVAILABLE")
