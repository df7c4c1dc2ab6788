"""Bearer tokens the test suite uses: an admin token every test app accepts, and one per role."""
from __future__ import annotations

from typing import Any

from flask.testing import FlaskClient

from fhir_ai.auth.tokens import hash_token

TEST_TOKEN = "test-admin-token-not-a-secret"
ROLE_TOKENS = {role: f"test-{role}-token" for role in ("ehr", "integrator", "auditor", "admin")}
TEST_TOKENS_SETTING = " ".join([f"test-suite:admin:{hash_token(TEST_TOKEN)}"] +
                               [f"{role}-client:{role}:{hash_token(token)}" for role, token in ROLE_TOKENS.items()])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class TokenClient(FlaskClient):
    """A test client that sends the admin token unless a request sets its own Authorization header."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {TEST_TOKEN}"
