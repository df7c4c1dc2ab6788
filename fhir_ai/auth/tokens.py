"""Bearer tokens: signed JWTs (RS384/ES384, checked against configured keys or a JWKS URL, with
exp, aud and iss) and, for small sites, static tokens stored only as sha256 hashes."""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jwt
import requests

from ..config import Settings
from ..errors import ConfigurationError, Unauthorized
from .scopes import ROLES, Scopes, role_of, role_scopes

log = logging.getLogger(__name__)

ALGORITHMS = ("RS384", "ES384")
CLIENT_NAME = re.compile(r"[A-Za-z0-9\-.]{1,64}")
JWKS_MAX_AGE = 3600.0           # seconds a fetched JWKS is used before it is fetched again
JWKS_MIN_REFRESH = 60.0         # an unknown kid triggers at most one extra fetch per this interval


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""
    client_id: str
    role: str
    scopes: Scopes
    kind: str                   # jwt | static
    issuer: str | None = None   # a JWT's iss (a client id is unique only at its issuer)


@dataclass(frozen=True)
class StaticToken:
    client_id: str
    role: str
    sha256: str


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


RESERVED_CLIENT = "fhir-ai"     # store.actors.LOCAL: who fhir_ai itself acts as


def parse_static_tokens(text: str) -> list[StaticToken]:
    """``client:role:sha256hex`` entries separated by commas or whitespace."""
    out = []
    for entry in text.replace(",", " ").split():
        parts = entry.split(":")
        if len(parts) != 3 or not CLIENT_NAME.fullmatch(parts[0]) or parts[1] not in ROLES or len(parts[2]) != 64:
            raise ConfigurationError(
                f"FHIR_AI_AUTH_TOKENS: {entry.split(':')[0]!r} must be client:role:sha256 with a client name of "
                f"A-Z a-z 0-9 - . , a role among "
                f"{', '.join(ROLES)} and the token's 64-digit sha256 (fhir-ai auth token prints one)",
                expression="auth_tokens")
        if parts[0] == RESERVED_CLIENT:
            raise ConfigurationError(
                f"FHIR_AI_AUTH_TOKENS: the client name {RESERVED_CLIENT!r} is fhir_ai's own (its scheduled jobs and "
                "Bulk Data runs are recorded under it); give the token another name", expression="auth_tokens")
        out.append(StaticToken(parts[0], parts[1], parts[2].lower()))
    return out


def _load_jwks(text: str) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        raw = text if text.lstrip().startswith("{") else Path(text).read_text(encoding="utf-8")
        keys = json.loads(raw)
        jwt.PyJWKSet.from_dict(keys)          # fail at start-up, not on the first request
        return keys
    except (OSError, ValueError, jwt.PyJWKError, jwt.PyJWKSetError) as exc:   # SetError: no usable key
        raise ConfigurationError(f"FHIR_AI_AUTH_JWKS: not a readable JWKS ({exc})", expression="auth_jwks") from exc


class TokenVerifier:
    """Checks one bearer token; every failure is ``Unauthorized`` with a reason that names no secret."""

    def __init__(self, *, static: list[StaticToken], jwks: dict[str, Any] | None = None, jwks_url: str = "",
                 issuers: list[str] | None = None, audience: str = "", leeway: float = 30.0,
                 fetch: Callable[[str], dict[str, Any]] | None = None) -> None:
        self.static = static
        self.jwks = jwks
        self.jwks_url = jwks_url
        self.issuers = issuers or []
        self.audience = audience
        self.leeway = leeway
        self._fetch = fetch or _fetch_json
        self._fetched: dict[str, Any] | None = None
        self._fetched_at = 0.0
        self._forced_at = -JWKS_MIN_REFRESH
        self._lock = threading.Lock()
        # Parsed keys (PyJWKSet.from_dict costs ~20 us a request): the configured set once, a fetched set
        # once per fetch (its keys, or None if it held no usable key).
        self._configured_keys: list[Any] | None = None
        self._fetched_keys: tuple[dict[str, Any], list[Any] | None] | None = None
        if (jwks or jwks_url) and not (self.issuers and self.audience):
            raise ConfigurationError("JWT bearer tokens need FHIR_AI_AUTH_ISSUER and FHIR_AI_AUTH_AUDIENCE",
                                     expression="auth_issuer")

    @classmethod
    def from_settings(cls, settings: Settings) -> "TokenVerifier":
        return cls(static=parse_static_tokens(settings.auth_tokens), jwks=_load_jwks(settings.auth_jwks),
                   jwks_url=settings.auth_jwks_url,
                   issuers=[i.strip() for i in settings.auth_issuer.split(",") if i.strip()],
                   audience=settings.auth_audience, leeway=settings.auth_leeway)

    @property
    def accepts_jwt(self) -> bool:
        return bool(self.jwks or self.jwks_url)

    def verify(self, token: str) -> Principal:
        if token.count(".") == 2:
            return self._verify_jwt(token)
        digest = hash_token(token)
        match = None
        for entry in self.static:             # compare every entry: no early exit to time
            if hmac.compare_digest(entry.sha256, digest):
                match = entry
        if match is None:
            raise Unauthorized("the bearer token is not valid")
        return Principal(match.client_id, match.role, role_scopes(match.role), "static")

    def _verify_jwt(self, token: str) -> Principal:
        if not self.accepts_jwt:
            raise Unauthorized("this server accepts no JWT bearer tokens (none configured)")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthorized("the bearer token is not a readable JWT") from exc
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise Unauthorized(f"JWT algorithm {alg!r} is not accepted (use {' or '.join(ALGORITHMS)})")
        key = self._key(header.get("kid"), alg)
        try:
            claims = jwt.decode(token, key, algorithms=[alg], audience=self.audience, issuer=self.issuers,
                                leeway=self.leeway, options={"require": ["exp", "iss", "aud", "sub"]})
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("the JWT has expired") from exc
        except jwt.InvalidAudienceError as exc:
            raise Unauthorized("the JWT is meant for another audience") from exc
        except jwt.InvalidIssuerError as exc:
            raise Unauthorized("the JWT's issuer is not trusted here") from exc
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"the JWT is not valid ({type(exc).__name__})") from exc
        raw_scope = claims.get("scope", claims.get("scp", ""))
        scopes = Scopes.parse(" ".join(raw_scope) if isinstance(raw_scope, list) else str(raw_scope))
        client = str(claims.get("client_id") or claims["sub"])
        return Principal(client, role_of(scopes), scopes, "jwt", str(claims["iss"]))

    def _key(self, kid: str | None, alg: str) -> Any:
        for refresh in (False, True):      # an unknown kid may be a rotated key: fetch once more
            candidates = [k for k in self._keysets(refresh) if kid is None or k.key_id == kid]
            if kid is None and len(candidates) > 1:
                raise Unauthorized("the JWT names no kid and several keys could have signed it")
            if candidates:
                return candidates[0].key
        raise Unauthorized("the JWT's signing key (kid) is not known here")

    def _keysets(self, refresh: bool) -> list[Any]:
        if self.jwks and self._configured_keys is None:
            parsed = self._parse(self.jwks)
            if parsed is None:
                raise Unauthorized("no usable signing key is configured here")
            self._configured_keys = parsed
        out = list(self._configured_keys or [])
        if self.jwks_url:
            with self._lock:
                now = time.monotonic()
                forced = refresh and now - self._forced_at > JWKS_MIN_REFRESH
                if forced:
                    self._forced_at = now
                if self._fetched is None or forced or now - self._fetched_at > JWKS_MAX_AGE:
                    try:
                        self._fetched = self._fetch(self.jwks_url)
                        self._fetched_at = time.monotonic()
                    except (requests.RequestException, ValueError) as exc:
                        log.warning("JWKS fetch failed (%s)", type(exc).__name__)
                        if self._fetched is None:
                            raise Unauthorized("the signing keys cannot be fetched right now") from exc
                fetched = self._fetched
            parsed = self._fetched_keys
            if not fetched:                                 # an empty answer: no usable key
                parsed = (fetched, None)
            elif parsed is None or parsed[0] is not fetched:
                parsed = self._fetched_keys = (fetched, self._parse(fetched))
            if parsed[1] is None:
                log.warning("the JWKS at the configured URL holds no usable key")
            else:
                out += parsed[1]
        return out

    @staticmethod
    def _parse(keyset: dict[str, Any]) -> list[Any] | None:
        try:
            return list(jwt.PyJWKSet.from_dict(keyset).keys)
        except (jwt.PyJWKError, jwt.PyJWKSetError):     # a set with no usable key raises the latter
            return None


def _fetch_json(url: str) -> dict[str, Any]:
    response = requests.get(url, timeout=5.0, headers={"Accept": "application/json"})
    response.raise_for_status()
    return response.json()
