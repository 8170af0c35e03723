"""Bearer-token verification: who the caller is (tenant) and what it may do (scopes)."""
from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jwt
from jwt.types import Options

from userexport_server.errors import PermissionDenied, Unauthenticated

TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
READ = frozenset({"read:users"})
READ_OR_CREATE = frozenset({"read:users", "create:users"})
_ASYMMETRIC = ["RS256", "ES256"]


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    scopes: frozenset[str]
    subject: str | None = None

    def require(self, any_of: frozenset[str]) -> None:
        if not self.scopes & any_of:
            expected = ", ".join(sorted(any_of, key=lambda s: (s != "read:users", s)))
            raise PermissionDenied(f"Insufficient scope; expected any of: {expected}.")


class Authenticator:
    """Verifies HS256 tokens with a shared secret and RS256/ES256 tokens with keys from a JWKS file."""

    def __init__(self, *, secret: bytes | None, jwks_file: str | pathlib.Path | None, issuer: str | None,
                 audience: str | None, tenant_claim: str, leeway: float) -> None:
        self.secret = secret or None
        self.keys = _load_jwks(pathlib.Path(jwks_file)) if jwks_file else {}
        self.issuer, self.audience = issuer or None, audience or None
        self.tenant_claim, self.leeway = tenant_claim, leeway

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
        token = _bearer_token(metadata)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthenticated("Malformed token: not a JWT.") from exc
        key, algorithms = self._key_for(header)
        options: Options = {"require": ["exp"], "verify_aud": self.audience is not None,
                                   "verify_iss": self.issuer is not None}
        try:
            claims = jwt.decode(token, key, algorithms=algorithms, audience=self.audience, issuer=self.issuer,
                                leeway=self.leeway, options=options)
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated("Token expired.", reason="TOKEN_EXPIRED") from exc
        except jwt.ImmatureSignatureError as exc:
            raise Unauthenticated("Token not yet valid (nbf/iat in the future).", reason="TOKEN_NOT_YET_VALID") from exc
        except jwt.InvalidAudienceError as exc:
            raise Unauthenticated(f"Token audience is not {self.audience!r}.", reason="WRONG_AUDIENCE") from exc
        except jwt.InvalidIssuerError as exc:
            raise Unauthenticated(f"Token issuer is not {self.issuer!r}.", reason="WRONG_ISSUER") from exc
        except jwt.InvalidSignatureError as exc:
            raise Unauthenticated("Token signature is invalid.", reason="BAD_SIGNATURE") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"Token lacks the {exc.claim!r} claim.") from exc
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"Invalid token: {exc}.") from exc
        tenant = claims.get(self.tenant_claim)
        if not isinstance(tenant, str) or not TENANT_PATTERN.match(tenant):
            raise Unauthenticated(f"Token has no valid {self.tenant_claim!r} claim naming the tenant.",
                                  reason="NO_TENANT")
        return Principal(tenant=tenant, scopes=_scopes(claims), subject=claims.get("sub"))

    def _key_for(self, header: dict[str, Any]) -> tuple[Any, list[str]]:
        """The key and the one algorithm family it may verify: no HS/RS confusion, never `none`."""
        algorithm = header.get("alg")
        if algorithm == "HS256" and self.secret is not None:
            return self.secret, ["HS256"]
        if algorithm in _ASYMMETRIC and self.keys:
            kid = header.get("kid")
            key = self.keys.get(kid) if kid is not None else next(iter(self.keys.values())) \
                if len(self.keys) == 1 else None
            if key is None:
                raise Unauthenticated(f"Token signed with unknown key id {kid!r}.", reason="UNKNOWN_KEY")
            return key, [algorithm]
        raise Unauthenticated(f"Token algorithm {algorithm!r} is not accepted.", reason="BAD_ALGORITHM")


def _bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    values = [v for k, v in (metadata or ()) if k == "authorization"]
    if not values:
        raise Unauthenticated("Missing authorization metadata: send 'authorization: Bearer <token>'.",
                              reason="MISSING_TOKEN")
    value = values[0].decode() if isinstance(values[0], bytes) else values[0]
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("Authorization metadata must be 'Bearer <token>'.", reason="MALFORMED_TOKEN")
    return token.strip()


def _scopes(claims: dict[str, Any]) -> frozenset[str]:
    scopes: set[str] = set()
    if isinstance(claims.get("scope"), str):
        scopes.update(claims["scope"].split())
    if isinstance(claims.get("permissions"), list):
        scopes.update(p for p in claims["permissions"] if isinstance(p, str))
    return frozenset(scopes)


def _load_jwks(path: pathlib.Path) -> dict[str | None, Any]:
    """Public keys by `kid` from a JWKS file (RSA and EC keys)."""
    try:
        keyset = jwt.PyJWKSet.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, jwt.PyJWKSetError) as exc:
        raise ValueError(f"cannot load JWKS file {path}: {exc}") from exc
    return {key.key_id: key.key for key in keyset.keys}
