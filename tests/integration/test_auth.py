"""Tokens and scopes on a real server: each failure is UNAUTHENTICATED or PERMISSION_DENIED."""
from __future__ import annotations

import json
import time
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.harness import ServerHandle, new_tenant
from tests.integration.support import error_reason
from userexport.v1 import users_export_pb2 as pb
from userexport.v1 import users_export_pb2_grpc as pb_grpc

SECRET_CLAIMS = {"iss": "userexport-local", "aud": "userexport", "scope": "read:users"}


def call_get(server: ServerHandle, metadata: list[tuple[str, str]] | None) -> grpc.RpcError:
    stub = pb_grpc.UsersExportServiceStub(grpc.insecure_channel(server.target))
    with pytest.raises(grpc.RpcError) as error:
        stub.GetJob(pb.GetJobRequest(id="job_" + "A" * 16), metadata=metadata)
    return error.value


def hs256(server: ServerHandle, secret: bytes | None = None, **claims: Any) -> list[tuple[str, str]]:
    now = int(time.time())
    body = {**SECRET_CLAIMS, "tenant": "acme", "iat": now, "nbf": now, "exp": now + 300, **claims}
    body = {k: v for k, v in body.items() if v is not None}
    key = secret if secret is not None else (server.data_dir / "jwt_secret").read_bytes()
    return [("authorization", "Bearer " + jwt.encode(body, key, algorithm="HS256"))]


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
