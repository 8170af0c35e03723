"""Bearer-token verification: who the caller is (tenant) and what it may do (scopes)."""
from __future__ import annotations

import json
import logging
import pathlib
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jwt
from jwt.types import Options

from userexport_server.errors import PermissionDenied, Unauthenticated
from userexport_server.identifiers import TENANT, matches
from userexport_server.logs import EventLog, RateLimitedLog

log = EventLog(__name__)
_fetch_failures = RateLimitedLog(log)
READ = frozenset({"read:users"})
READ_OR_CREATE = frozenset({"read:users", "create:users"})
_ASYMMETRIC = ["RS256", "ES256"]
_FETCH_TIMEOUT_SECONDS = 5.0
# Verified tokens remembered (until their exp), so a caller's repeated calls skip the signature check;
# only those verified with keys fixed at startup (the secret, a JWKS file), since a JWKS URL's keys rotate.
VERIFIED_TOKENS = 10_000


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    scopes: frozenset[str]
    subject: str | None = None

    def require(self, any_of: frozenset[str]) -> None:
        if not self.scopes & any_of:
            expected = ", ".join(sorted(any_of, key=lambda s: (s != "read:users", s)))
            raise PermissionDenied(f"Insufficient scope; expected any of: {expected}.",
                                   metadata={"required_scopes": expected})


class _KeyFile:
    """Public keys read once from a JWKS file at startup."""

    fetches = False

    def __init__(self, path: pathlib.Path) -> None:
        try:
            self.keys = _signing_keys(jwt.PyJWKSet.from_dict(json.loads(path.read_text())))
        except (OSError, ValueError, TypeError, jwt.PyJWKSetError, jwt.PyJWKError) as exc:
            raise ValueError(f"USEREXPORT_JWT_JWKS_FILE={path}: cannot load the JWKS: {exc}") from exc
        if not self.keys:
            raise ValueError(f"USEREXPORT_JWT_JWKS_FILE={path}: the JWKS holds no signing key")

    def key(self, kid: str | None) -> jwt.PyJWK:
        return _pick(self.keys, kid)


class _KeyUrl:
    """Public keys fetched from a JWKS URL by PyJWT's client: the set is cached `cache_seconds`, and a
    token with an unknown kid re-fetches it at most once per `cooldown_seconds`, so a rotated key
    is picked up without a restart and a flood of made-up kids cannot flood the issuer."""

    fetches = True

    def __init__(self, url: str, *, cache_seconds: float, cooldown_seconds: float) -> None:
        try:
            self.client = jwt.PyJWKClient(url, lifespan=cache_seconds, cooldown_duration=cooldown_seconds,
                                          timeout=_FETCH_TIMEOUT_SECONDS)
        except jwt.PyJWKClientError as exc:
            raise ValueError(f"USEREXPORT_JWT_JWKS_URL={url!r}: {exc}") from exc
        self.url = url

    def key(self, kid: str | None) -> jwt.PyJWK:
        try:
            keys = _signing_keys(self.client.get_jwk_set())
        except (jwt.PyJWKClientError, jwt.PyJWKSetError, jwt.PyJWKError, ValueError) as exc:
            _fetch_failures.log(logging.WARNING, "jwks fetch", "jwks fetch failed", url=self.url, error=exc)
            raise Unauthenticated("The token signing keys cannot be loaded; retry later.",
                                  reason="KEYS_UNAVAILABLE") from exc
        if kid is None or any(key.key_id == kid for key in keys):
            return _pick(keys, kid)
        try:  # unknown kid: perhaps a rotated key; the client refreshes the set if its cooldown allows
            return self.client.get_signing_key(kid)
        except (jwt.PyJWKClientError, jwt.PyJWKSetError, jwt.PyJWKError, ValueError) as exc:
            raise _unknown_key(kid) from exc


class Authenticator:
    """Verifies HS256 tokens with a shared secret, and RS256/ES256 tokens with keys from a JWKS file or URL."""

    def __init__(self, *, secret: bytes | None, jwks_file: str | pathlib.Path | None, issuer: str | None,
                 audience: str | None, tenant_claim: str, leeway: float, jwks_url: str | None = None,
                 jwks_cache_seconds: float = 300.0, jwks_cooldown_seconds: float = 30.0) -> None:
        self.secret = secret or None
        self.keys: _KeyFile | _KeyUrl | None = None
        if jwks_file:
            self.keys = _KeyFile(pathlib.Path(jwks_file))
        elif jwks_url:
            self.keys = _KeyUrl(jwks_url, cache_seconds=jwks_cache_seconds, cooldown_seconds=jwks_cooldown_seconds)
        self.issuer, self.audience = issuer or None, audience or None
        self.tenant_claim, self.leeway = tenant_claim, leeway
        # token -> (its principal, its exp): a signature, once checked, holds until the token expires.
        self._verified: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        self._verified_lock = threading.Lock()

    @property
    def fetches_keys(self) -> bool:
        """Whether authenticate() may block on the network (a JWKS URL), so callers run it in a thread."""
        return self.keys is not None and self.keys.fetches

    def remembered(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal | None:
        """The principal of a token verified before and not yet expired; None: authenticate() it.
        Never blocks, so the event loop calls it directly."""
        try:
            token = _bearer_token(metadata)
        except Unauthenticated:
            return None
        with self._verified_lock:
            found = self._verified.get(token)
            if found is None:
                return None
            if time.time() >= found[1]:
                del self._verified[token]
                return None
            self._verified.move_to_end(token)
            return found[0]

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
        token = _bearer_token(metadata)
        principal, expires = self._verify(token)
        if self.fetches_keys and jwt.get_unverified_header(token).get("alg") != "HS256":
            return principal  # keys at a URL rotate: a token is good only while its key is in the set
        with self._verified_lock:
            self._verified[token] = (principal, expires)
            while len(self._verified) > VERIFIED_TOKENS:
                self._verified.popitem(last=False)
        return principal

    def _verify(self, token: str) -> tuple[Principal, float]:
        """The token's principal and its exp, or Unauthenticated saying what is wrong."""
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
            raise Unauthenticated(f"Token audience is not {self.audience!r}.", reason="WRONG_AUDIENCE",
                                  metadata={"audience": str(self.audience)}) from exc
        except jwt.InvalidIssuerError as exc:
            raise Unauthenticated(f"Token issuer is not {self.issuer!r}.", reason="WRONG_ISSUER",
                                  metadata={"issuer": str(self.issuer)}) from exc
        except jwt.InvalidSignatureError as exc:
            raise Unauthenticated("Token signature is invalid.", reason="BAD_SIGNATURE") from exc
        except jwt.InvalidAlgorithmError as exc:
            raise Unauthenticated(f"Token algorithm {header.get('alg')!r} does not fit its key.",
                                  reason="BAD_ALGORITHM", metadata={"alg": str(header.get("alg"))}) from exc
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"Token lacks the {exc.claim!r} claim.", metadata={"claim": exc.claim}) from exc
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"Invalid token: {exc}.") from exc
        _check_numeric_dates(claims)
        tenant = claims.get(self.tenant_claim)
        if not isinstance(tenant, str) or not matches(TENANT, tenant):
            raise Unauthenticated(f"Token has no valid {self.tenant_claim!r} claim naming the tenant.",
                                  reason="NO_TENANT", metadata={"claim": self.tenant_claim})
        subject = claims.get("sub")
        principal = Principal(tenant=tenant, scopes=_scopes(claims),
                              subject=subject if isinstance(subject, str) else None)
        return principal, float(claims["exp"])

    def _key_for(self, header: dict[str, Any]) -> tuple[Any, list[str] | None]:
        """The key and the algorithms it may verify: no HS/RS confusion, never `none`. A JWK carries
        its own algorithm (from its `alg`, or its key type and curve), which PyJWT holds the token to."""
        algorithm = header.get("alg")
        if algorithm == "HS256" and self.secret is not None:
            return self.secret, ["HS256"]
        if algorithm in _ASYMMETRIC and self.keys is not None:
            return self.keys.key(header.get("kid")), None
        raise Unauthenticated(f"Token algorithm {algorithm!r} is not accepted.", reason="BAD_ALGORITHM",
                              metadata={"alg": str(algorithm)})


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


def _check_numeric_dates(claims: dict[str, Any]) -> None:
    """RFC 7519 dates are JSON numbers; PyJWT also takes "1700000000" (a string int() accepts)."""
    for claim in ("exp", "nbf", "iat"):
        value = claims.get(claim)
        if claim in claims and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise Unauthenticated(f"Token claim {claim!r} must be a number of seconds since the epoch.",
                                  metadata={"claim": claim})


def _scopes(claims: dict[str, Any]) -> frozenset[str]:
    scopes: set[str] = set()
    if isinstance(claims.get("scope"), str):
        scopes.update(claims["scope"].split())
    if isinstance(claims.get("permissions"), list):
        scopes.update(p for p in claims["permissions"] if isinstance(p, str))
    return frozenset(scopes)


def _signing_keys(keyset: jwt.PyJWKSet) -> list[jwt.PyJWK]:
    """The set's keys usable for signatures (`use` absent or "sig") of an accepted algorithm."""
    return [key for key in keyset.keys if key.public_key_use in ("sig", None) and key.algorithm_name in _ASYMMETRIC]


def _pick(keys: list[jwt.PyJWK], kid: str | None) -> jwt.PyJWK:
    """The key named by `kid`; without a kid, the only key, if there is just one."""
    found = [key for key in keys if key.key_id == kid] if kid is not None else keys[:1] if len(keys) == 1 else []
    if not found:
        raise _unknown_key(kid)
    return found[0]


def _unknown_key(kid: str | None) -> Unauthenticated:
    if kid is None:
        return Unauthenticated("Token has no key id (kid) and the key set holds several keys.", reason="UNKNOWN_KEY")
    return Unauthenticated(f"Token signed with unknown key id {kid!r}.", reason="UNKNOWN_KEY",
                           metadata={"kid": str(kid)})
