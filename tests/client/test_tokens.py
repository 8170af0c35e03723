"""Development tokens: the claims the server verifies, and the secret file it writes."""
from __future__ import annotations

import os
import pathlib

import jwt
import pytest

from userexport.client.cli import main
from userexport.client.tokens import SECRET_FILENAME, MissingSecretError, mint_token, read_secret

SECRET = bytes(range(32))


def decode(token: str, secret: bytes = SECRET, **kwargs: str) -> dict:
    return jwt.decode(
        token,
        secret,
        algorithms=["HS256"],
        audience=kwargs.get("audience", "userexport"),
        issuer=kwargs.get("issuer", "userexport-local"),
    )


def test_mint_token_round_trip() -> None:
    claims = decode(mint_token(SECRET, "acme", ["read:users", "create:users"]))
    assert claims["sub"] == "dev:acme"
    assert claims["tenant"] == "acme"
    assert claims["scope"] == "read:users create:users"
    assert claims["iat"] == claims["nbf"]
    assert claims["exp"] - claims["iat"] == 3600


def test_mint_token_options() -> None:
    token = mint_token(
        SECRET, "acme", ["read:users"], issuer="me", audience="you", ttl_seconds=60, tenant_claim="org"
    )
    claims = decode(token, issuer="me", audience="you")
    assert claims["org"] == "acme" and "tenant" not in claims
    assert claims["exp"] - claims["iat"] == 60


def test_token_signed_with_another_secret_is_rejected() -> None:
    with pytest.raises(jwt.InvalidSignatureError):
        decode(mint_token(os.urandom(32), "acme", ["read:users"]))


def test_non_positive_ttl_is_refused() -> None:
    with pytest.raises(ValueError):
        mint_token(SECRET, "acme", ["read:users"], ttl_seconds=0)


def test_read_secret_returns_raw_bytes(tmp_path: pathlib.Path) -> None:
    raw = b"\x00\xff\n" + os.urandom(29)
    (tmp_path / SECRET_FILENAME).write_bytes(raw)
    assert SECRET_FILENAME == "jwt_secret"
    assert read_secret(tmp_path) == raw


@pytest.mark.parametrize("content", [None, b""])
def test_read_secret_missing_or_empty(tmp_path: pathlib.Path, content: bytes | None) -> None:
    if content is not None:
        (tmp_path / SECRET_FILENAME).write_bytes(content)
    with pytest.raises(MissingSecretError, match="start the server once"):
        read_secret(tmp_path)


def test_cli_token_prints_a_valid_token(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / SECRET_FILENAME).write_bytes(SECRET)
    argv = ["--data-dir", str(tmp_path), "token", "--tenant", "acme",
            "--scope", "read:users", "--scope", "create:users", "--ttl", "120"]
    assert main(argv) == 0
    claims = decode(capsys.readouterr().out.strip())
    assert claims["tenant"] == "acme"
    assert claims["scope"] == "read:users create:users"
    assert claims["exp"] - claims["iat"] == 120


def test_cli_token_defaults_to_read_users(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / SECRET_FILENAME).write_bytes(SECRET)
    assert main(["token", "--data-dir", str(tmp_path)]) == 0
    claims = decode(capsys.readouterr().out.strip())
    assert claims["scope"] == "read:users" and claims["tenant"] == "default"


def test_cli_token_without_secret_says_how_to_get_one(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--data-dir", str(tmp_path), "token", "--tenant", "acme"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / SECRET_FILENAME) in err and "start the server once to create it" in err
