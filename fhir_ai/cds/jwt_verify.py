"""Verify the JWT a CDS Client (the EHR) signs for each call (CDS Hooks 2.0 "Trusting CDS Clients").

Rules: ``kid`` required; only RS384 and ES384 (``none`` and every HMAC refused before any key is
looked at); ``iss`` on the configured allow-list; the key from that issuer's configured JWKS, or
from the ``jku`` header only when that exact URL is allowed for that issuer; ``aud`` equal to the
exact URL called; ``exp``, ``iat`` and ``jti`` required; a ``jti`` seen before is a replay.

Replay protection is store-backed (table ``cds_jti``), not in memory: ``fhir-ai serve`` runs
several gunicorn workers, and a replay sent to another worker must fail too.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jwt
import requests

from ..errors import ConfigurationError, Unauthorized

log = logging.getLogger(__name__)

ALGORITHMS = ("RS384", "ES384")
KEY_TYPES = {"RS384": "RSA", "ES384": "EC"}
JWKS_TTL = 300.0          # seconds a fetched JWK Set is trusted before it is fetched again
JWKS_REFETCH_GAP = 30.0   # an unknown kid triggers at most one refetch per URL in this time


@dataclass(frozen=True)
class Issuer:
    """One trusted EHR: its configured JWK Set (inline or by URL) and the jku URLs allowed for it."""
    iss: str
    jwks: dict[str, Any] | None = None
    jwks_url: str | None = None
    jku: tuple[str, ...] = ()


@dataclass(frozen=True)
class Verified:
    """What a verified token tells us about the caller."""
    issuer: str
    jti: str
    tenant: str | None
    claims: dict[str, Any]


def parse_issuers(raw: str | dict[str, Any] | None) -> dict[str, Issuer]:
    """Settings.cds_issuers (JSON text, a path to a JSON file, or a dict) → trusted issuers."""
    if not raw:
        return {}
    data: Any = raw
    if isinstance(raw, str):
        text = raw.strip()
        if not text.startswith("{"):
            try:
                text = Path(text).read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigurationError(f"cds_issuers: cannot read {raw!r}: {exc}",
                                         expression="cds_issuers") from exc
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigurationError(f"cds_issuers: not JSON: {exc}", expression="cds_issuers") from exc
    if not isinstance(data, dict):
        raise ConfigurationError("cds_issuers must map each iss to its keys", expression="cds_issuers")
    out = {}
    for iss, spec in data.items():
        where = f"cds_issuers.{iss}"
        if not isinstance(spec, dict) or not (spec.get("jwks") or spec.get("jwks_url") or spec.get("jku")):
            raise ConfigurationError(f"{where}: give jwks, jwks_url or jku", expression=where)
        jku = spec.get("jku") or []
        if isinstance(jku, str):
            jku = [jku]
        out[iss] = Issuer(iss, spec.get("jwks"), spec.get("jwks_url"), tuple(jku))
    return out


@dataclass
class _Cached:
    keys: dict[str, Any]
    fetched: float


@dataclass
class JwtVerifier:
    """Verifies CDS Hooks JWTs; one per app (caches fetched JWK Sets)."""
    issuers: dict[str, Issuer]
    use_jti: Callable[[str, str, datetime], bool]     # Store.use_jti
    leeway: float = 30.0
    max_lifetime: float = 3600.0
    fetch_timeout: float = 5.0
    session: requests.Session = field(default_factory=requests.Session)
    clock: Callable[[], float] = time.time
    _cache: dict[str, _Cached] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def verify(self, authorization: str | None, audience: str) -> Verified:
        """The caller's identity, or Unauthorized saying exactly which rule failed."""
        token = _bearer(authorization)
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"the JWT is malformed ({exc})") from exc
        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none":
            raise Unauthorized("unsigned JWTs (alg 'none') are refused")
        if alg.upper().startswith("HS"):
            raise Unauthorized(f"symmetric algorithm {alg} refused (CDS Hooks forbids shared-secret JWTs)")
        if alg not in ALGORITHMS:
            raise Unauthorized(f"algorithm {alg} not accepted; use {' or '.join(ALGORITHMS)}")
        typ = header.get("typ")
        if typ is not None and str(typ).upper() != "JWT":
            raise Unauthorized(f"typ must be JWT, got {typ!r}")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Unauthorized("the JWT header has no kid")
        iss = unverified.get("iss")
        issuer = self.issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise Unauthorized(f"issuer {iss!r} is not trusted here")
        key = self._key(issuer, header, kid, alg)
        try:
            claims = jwt.decode(token, key=key, algorithms=[alg], audience=audience, issuer=issuer.iss,
                                leeway=self.leeway,
                                options={"require": ["iss", "aud", "exp", "iat", "jti"]})
        except jwt.InvalidAudienceError as exc:
            raise Unauthorized(f"aud must be exactly {audience!r}") from exc
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("the JWT has expired") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f"the JWT lacks the {exc.claim!r} claim") from exc
        except jwt.InvalidSignatureError as exc:
            raise Unauthorized("the JWT signature does not verify") from exc
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"the JWT is not valid ({exc})") from exc
        now = self.clock()
        if float(claims["exp"]) - now > self.max_lifetime:
            raise Unauthorized(f"the JWT lives longer than {int(self.max_lifetime)} s; send short-lived tokens")
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti:
            raise Unauthorized("jti must be a non-empty string")
        expires = datetime.fromtimestamp(float(claims["exp"]) + self.leeway, timezone.utc)
        if not self.use_jti(issuer.iss, jti, expires):
            log.warning("replayed JWT from %s refused", issuer.iss)
            raise Unauthorized("this JWT (jti) was already used; every call needs a fresh token")
        tenant = claims.get("tenant")
        return Verified(issuer.iss, jti, tenant if isinstance(tenant, str) else None, claims)

    # -- keys -----------------------------------------------------------------------------------
    def _key(self, issuer: Issuer, header: dict[str, Any], kid: str, alg: str) -> Any:
        jku = header.get("jku")
        if jku is not None:
            if jku not in issuer.jku:
                raise Unauthorized(f"jku {jku!r} is not on the allow-list for issuer {issuer.iss!r}")
            jwk = self._from_url(jku, kid)
        elif issuer.jwks is not None:
            jwk = _find(issuer.jwks, kid)
        elif issuer.jwks_url:
            jwk = self._from_url(issuer.jwks_url, kid)
        else:
            raise Unauthorized(f"issuer {issuer.iss!r} must name its key set with jku")
        if jwk is None:
            raise Unauthorized(f"no key {kid!r} in the key set of issuer {issuer.iss!r}")
        if jwk.get("kty") != KEY_TYPES[alg] or jwk.get("alg", alg) != alg:
            raise Unauthorized(f"key {kid!r} is a {jwk.get('kty')}/{jwk.get('alg')} key, not for {alg}")
        try:
            return jwt.PyJWK(jwk, algorithm=alg).key
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"key {kid!r} of issuer {issuer.iss!r} is unusable ({exc})") from exc

    def _from_url(self, url: str, kid: str) -> dict[str, Any] | None:
        with self._lock:
            cached = self._cache.get(url)
        now = self.clock()
        if cached is None or now - cached.fetched > JWKS_TTL:
            cached = self._fetch(url)
        elif kid not in cached.keys and now - cached.fetched > JWKS_REFETCH_GAP:
            cached = self._fetch(url)      # the EHR may have rotated its keys
        return cached.keys.get(kid)

    def _fetch(self, url: str) -> _Cached:
        try:
            response = self.session.get(url, timeout=self.fetch_timeout, headers={"Accept": "application/json"})
            response.raise_for_status()
            body = response.json()
        except (requests.RequestException, ValueError) as exc:
            log.warning("cannot fetch JWK Set from %s (%s)", url, type(exc).__name__)
            raise Unauthorized(f"cannot fetch the JWK Set at {url} to verify the JWT") from exc
        keys = {k["kid"]: k for k in (body.get("keys") or []) if isinstance(k, dict) and k.get("kid")}
        cached = _Cached(keys, self.clock())
        with self._lock:
            self._cache[url] = cached
        return cached


def _find(jwks: dict[str, Any], kid: str) -> dict[str, Any] | None:
    for key in jwks.get("keys") or []:
        if isinstance(key, dict) and key.get("kid") == kid:
            return key
    return None


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise Unauthorized("a CDS Hooks call needs 'Authorization: Bearer <JWT>'")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <JWT>'")
    return token.strip()
