"""`fhir-ai auth token`: make a static bearer token for a small site (only its hash is configured)."""
from __future__ import annotations

import secrets

import click

from .scopes import ROLES
from .tokens import CLIENT_NAME, RESERVED_CLIENT, hash_token


@click.group("auth")
def auth() -> None:
    """Bearer tokens for callers of the API."""


@auth.command("token")
@click.option("--client", required=True, help="A name for the caller (appears in every audit event).")
@click.option("--role", type=click.Choice(sorted(ROLES)), required=True,
              help="ehr: assess and read; integrator: mappings and write-back; auditor: read the trail.")
def token(client: str, role: str) -> None:
    """Print a new random token (give it to the caller) and its FHIR_AI_AUTH_TOKENS entry (configure it)."""
    if not CLIENT_NAME.fullmatch(client):
        raise click.BadParameter("1-64 of A-Z a-z 0-9 - . (it is searchable as AuditEvent?agent=...)",
                                 param_hint="--client")
    if client == RESERVED_CLIENT:
        raise click.BadParameter(f"{RESERVED_CLIENT!r} is fhir_ai's own name; choose another", param_hint="--client")
    value = secrets.token_urlsafe(32)
    click.echo(f"token (give to {client}, shown once): {value}")
    click.echo(f"FHIR_AI_AUTH_TOKENS entry: {client}:{role}:{hash_token(value)}")
