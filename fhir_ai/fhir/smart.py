"""SMART Backend Services: client-credentials tokens obtained with a signed JWT assertion.

https://hl7.org/fhir/smart-app-launch/backend-services.html — the assertion carries
``iss`` = ``sub`` = client id, ``aud`` = the token URL, ``exp`` at most five minutes ahead, a
unique ``jti`` and the key's ``kid``; RS384 and ES384 are the algorithms clients SHALL support.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jwt
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ..config import Settings
from ..errors import ConfigurationError, UpstreamError

log = logging.getLogger(__name__)

ALGORITHMS = ("RS384", "ES384")
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME = 300          # seconds; the specification's ceiling
DEFAULT_SCOPES = ("system/Patient.rs system/Encounter.rs system/Observation.rs "
                  "system/RiskAssessment.cu")
RENEW_MARGIN = 60.0               # renew this long before the token expires


def load_private_key(pem_or_path: str) -> Any:
    """A private key from PEM text or from the path of a PEM file (the value is never logged)."""
    text = pem_or_path.strip()
    if not text.startswith("-----BEGIN"):
        try:
            text = Path(text).read_text()
        except OSError as exc:
            raise ConfigurationError(f"SMART private key file cannot be read ({exc.strerror})",
                                     expression="smart_private_key") from None
    try:
        return serialization.load_pem_private_key(text.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"SMART private key is not an unencrypted PEM private key "
                                 f"({type(exc).__name__})", expression="smart_private_key") from None


def public_jwk(private_key: Any, alg: str, kid: str | None = None) -> dict[str, Any]:
    """The public half as a JWK (what the hospital registers for this client)."""
    algorithm = jwt.get_algorithm_by_name(alg)
    jwk = json.loads(algorithm.to_jwk(private_key.public_key()))
    jwk.update({"alg": alg, "use": "sig", "kid": kid or thumbprint(jwk)})
    return jwk


def thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 JWK thumbprint: a stable default ``kid`` when none is configured."""
    members = ("e", "kty", "n") if jwk["kty"] == "RSA" else ("crv", "kty", "x", "y")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _check_key(private_key: Any, alg: str) -> None:
    if alg not in ALGORITHMS:
        raise ConfigurationError(f"SMART signing algorithm {alg!r} is not one of "
                                 f"{', '.join(ALGORITHMS)}", expression="smart_alg")
    wanted = rsa.RSAPrivateKey if alg == "RS384" else ec.EllipticCurvePrivateKey
    if not isinstance(private_key, wanted):
        raise ConfigurationError(f"SMART key does not fit {alg} (RS384 needs an RSA key, ES384 a "
                                 "P-384 EC key)", expression="smart_private_key")
    if alg == "ES384" and private_key.curve.name != "secp384r1":
        raise ConfigurationError("ES384 needs a P-384 (secp384r1) key",
                                 expression="smart_private_key")


class SmartBackendAuth:
    """Gets, caches and renews a SMART Backend Services access token for one FHIR server.

    Plugs into FhirClient as its ``auth``: ``headers()`` before each request,
    ``on_unauthorized()`` when the server answers 401 (FhirClient then tries once more).
    """

    def __init__(self, base_url: str, client_id: str, private_key: Any, *, alg: str = "RS384",
                 kid: str | None = None, scopes: str = DEFAULT_SCOPES,
                 token_url: str | None = None, timeout: float = 10.0,
                 session: requests.Session | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        _check_key(private_key, alg)
        if not client_id:
            raise ConfigurationError("SMART client id is empty", expression="smart_client_id")
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id
        self.alg = alg
        self.scopes = scopes
        self.timeout = timeout
        self._key = private_key
        self.kid = kid or public_jwk(private_key, alg)["kid"]
        self._token_url = token_url
        self._session = session or requests.Session()
        self._clock = clock
        self._lock = threading.Lock()   # threads of one worker share one token
        self._token: str | None = None
        self._renew_at = 0.0
        self.tokens_fetched = 0

    def __repr__(self) -> str:  # never show the key or the token
        return f"SmartBackendAuth({self.base_url!r}, client_id={self.client_id!r}, alg={self.alg})"

    # -- the FhirClient hook ----------------------------------------------------------------------

    def headers(self) -> dict[str, str]:
        with self._lock:
            if self._token is None or self._clock() >= self._renew_at:
                self._fetch_token()
            return {"Authorization": f"Bearer {self._token}"}

    def on_unauthorized(self) -> None:
        """The server refused our token (revoked, rotated keys): forget it; the next call renews."""
        with self._lock:
            self._token = None

    # -- discovery and the grant -------------------------------------------------------------------

    def token_url(self) -> str:
        """The token endpoint, from configuration or ``{base}/.well-known/smart-configuration``."""
        if self._token_url is None:
            config = self.smart_configuration()
            endpoint = config.get("token_endpoint")
            if not isinstance(endpoint, str) or not endpoint.startswith(("https://", "http://")):
                raise UpstreamError("the hospital's smart-configuration names no token_endpoint",
                                    temporary=False)
            self._token_url = endpoint
        return self._token_url

    def smart_configuration(self) -> dict[str, Any]:
        url = f"{self.base_url}/.well-known/smart-configuration"
        body = self._json("GET", url, "smart-configuration", headers={"Accept": "application/json"})
        return body

    def assertion(self, token_url: str) -> str:
        """A fresh signed client assertion (new ``jti`` each time, expires in five minutes)."""
        now = int(self._clock())
        claims = {"iss": self.client_id, "sub": self.client_id, "aud": token_url,
                  "iat": now, "exp": now + ASSERTION_LIFETIME, "jti": uuid.uuid4().hex}
        return jwt.encode(claims, self._key, algorithm=self.alg,
                          headers={"kid": self.kid, "typ": "JWT"})

    def _fetch_token(self) -> None:
        url = self.token_url()
        form = {"grant_type": "client_credentials", "scope": self.scopes,
                "client_assertion_type": ASSERTION_TYPE, "client_assertion": self.assertion(url)}
        asked_at = self._clock()
        body = self._json("POST", url, "token request", data=form,
                          headers={"Accept": "application/json"})
        token, expires_in = body.get("access_token"), body.get("expires_in")
        if not isinstance(token, str) or not token:
            raise UpstreamError("the token endpoint answered without an access_token",
                                temporary=False)
        # No expires_in: assume a short life rather than keep a token the server may drop.
        lifetime = float(expires_in) if isinstance(expires_in, (int, float)) else 300.0
        self._token = token
        self._renew_at = asked_at + max(lifetime - RENEW_MARGIN, lifetime / 2)
        self.tokens_fetched += 1
        log.info("SMART token for client %s: valid %.0f s, scope %s", self.client_id, lifetime,
                 body.get("scope", "(not stated)"))

    def _json(self, method: str, url: str, what: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._session.request(method, url, timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise UpstreamError(f"SMART {what}: {type(exc).__name__}", temporary=True) from None
        status = response.status_code
        if status >= 400:
            # OAuth errors carry 'error' and 'error_description' (RFC 6749 5.2); no secrets in them.
            try:
                err = response.json()
            except ValueError:
                err = {}
            reason = " ".join(str(err.get(k)) for k in ("error", "error_description")
                              if isinstance(err, dict) and err.get(k))
            log.warning("SMART %s: HTTP %d %s", what, status, reason)
            raise UpstreamError(f"SMART {what} refused (HTTP {status}){': ' + reason if reason else ''}",
                                temporary=status in (408, 429) or status >= 500,
                                upstream_status=status)
        try:
            body = response.json()
        except ValueError:
            raise UpstreamError(f"SMART {what}: the answer is not JSON", temporary=True,
                                upstream_status=status) from None
        if not isinstance(body, dict):
            raise UpstreamError(f"SMART {what}: the answer is not a JSON object", temporary=False,
                                upstream_status=status)
        return body


def auth_from_settings(settings: Settings, base_url: str | None = None) -> SmartBackendAuth | None:
    """The SMART auth for the configured source, or None when no SMART client is configured."""
    if not settings.smart_client_id:
        return None
    if not settings.smart_private_key:
        raise ConfigurationError("FHIR_AI_SMART_CLIENT_ID is set but FHIR_AI_SMART_PRIVATE_KEY "
                                 "(PEM or path) is not", expression="smart_private_key")
    if settings.source_token:
        raise ConfigurationError("configure either a static source token or a SMART client, "
                                 "not both", expression="source_token")
    return SmartBackendAuth(base_url or settings.source_url, settings.smart_client_id,
                            load_private_key(settings.smart_private_key), alg=settings.smart_alg,
                            kid=settings.smart_key_id or None, scopes=settings.smart_scopes,
                            token_url=settings.smart_token_url or None,
                            timeout=settings.source_timeout)
