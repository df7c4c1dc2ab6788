"""Authentication and authorisation: bearer tokens (JWT or hashed static), SMART-style scopes, roles.

Blueprints declare what they need with ``policy.public``, ``policy.authenticates_itself`` or
``policy.requires(resource, interaction)``; ``guard.init_app`` installs the request hooks.
"""
from .guard import init_app, set_actor
from .policy import authenticates_itself, public, requires
from .scopes import ROLES, Scopes

__all__ = ["ROLES", "Scopes", "authenticates_itself", "init_app", "public", "requires", "set_actor"]
