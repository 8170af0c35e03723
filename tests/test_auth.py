"""Token verification on its own (auth.py): verified tokens are remembered until their exp, so repeated
calls skip the signature check, and never longer; tokens that fail are never remembered; a malformed
JWKS file is an error naming its variable. (Tokens, scopes and keys on a real server:
tests/integration/test_auth.py.)"""
from __future__ import annotations

import json
import pathlib
import time

import jwt
import pytest

from userexport.client.tokens import DEFAULT_AUDIENCE, DEFAULT_ISSUER, mint_token
from userexport_server.auth import Authenticator
from userexport_server.errors import Unauthenticated

SECRET = b"s" * 32


def authenticator(secret: bytes = SECRET) -> Authenticator:
    return Authenticator(secret=secret, jwks_file=None, issuer=DEFAULT_ISSUER, audience=DEFAULT_AUDIENCE,
                         tenant_claim="tenant", leeway=0)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def test_a_verified_token_is_remembered_until_it_expires() -> None:
    auth = authenticator()
    token = mint_token(SECRET, "acme", ["read:users"], ttl_seconds=2)
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    assert auth.remembered(bearer(token)) is None  # never verified yet
    principal = auth.authenticate(bearer(token))
    assert auth.remembered(bearer(token)) == principal
    assert auth.remembered(bearer(mint_token(SECRET, "acme", ["read:users"], ttl_seconds=5))) is None
    time.sleep(max(0.0, exp - time.time()) + 0.05)
    assert auth.remembered(bearer(token)) is None
    with pytest.raises(Unauthenticated):
        auth.authenticate(bearer(token))


def test_a_token_that_fails_is_not_remembered() -> None:
    auth = authenticator()
    forged = mint_token(b"x" * 32, "acme", ["read:users"])
    with pytest.raises(Unauthenticated):
        auth.authenticate(bearer(forged))
    assert auth.remembered(bearer(forged)) is None
    assert auth.remembered([]) is None and auth.remembered(bearer("")) is None


def test_tokens_verified_with_keys_from_a_url_are_not_remembered() -> None:
    """A rotated-out key must refuse its tokens at once (tests/integration/test_auth.py checks that end to end), so
    tokens verified with a JWKS URL's keys are verified every time; the shared secret's still count."""
    auth = Authenticator(secret=SECRET, jwks_file=None, issuer=DEFAULT_ISSUER, audience=DEFAULT_AUDIENCE,
                         tenant_claim="tenant", leeway=0, jwks_url="http://127.0.0.1:1/jwks.json")
    assert auth.fetches_keys
    token = mint_token(SECRET, "acme", ["read:users"])
    auth.authenticate(bearer(token))
    assert auth.remembered(bearer(token)) is not None


MALFORMED_FILES = {"not JSON": "{", "keys not a list": '{"keys": "x"}', "no usable key": json.dumps(
    {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}), "RSA key without modulus": '{"keys": [{"kty": "RSA", "e": "AQAB"}]}'}


@pytest.mark.parametrize("case", MALFORMED_FILES, ids=list(MALFORMED_FILES))
def test_a_malformed_jwks_file_is_an_error_naming_the_variable(tmp_path: pathlib.Path, case: str) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(MALFORMED_FILES[case])
    with pytest.raises(ValueError, match="USEREXPORT_JWT_JWKS_FILE"):
        Authenticator(secret=None, jwks_file=path, issuer=None, audience=None, tenant_claim="tenant", leeway=0)
