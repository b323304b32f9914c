"""API keys: random, shown once, stored as a sha256 hash; the prefix identifies a key to people.

A key looks like `gh_<8 chars>_<43 chars>`; `gh_<8 chars>` is its prefix (kept in clear, not a
secret). Keys carry 256 random bits, so a plain sha256 is enough to store them: there is
nothing to brute-force, unlike a password, and lookups stay one indexed equality.

`TenantDep` (in `service.api.deps`) resolves `Authorization: Bearer <key>` to `CurrentTenant`.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy.orm import Session

from service.db.repositories import tenants as tenants_repo
from service.errors import GradhealthError

KEY_PREFIX = "gh_"
PREFIX_RANDOM_CHARS = 8


class AuthenticationError(GradhealthError):
    code = "unauthorized"
    status = 401


@dataclass(frozen=True)
class CurrentTenant:
    id: str
    name: str
    api_key_id: str


@dataclass(frozen=True)
class IssuedKey:
    key: str  # the only time the plain key exists
    prefix: str
    key_id: str
    tenant_id: str
    tenant_created: bool


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> tuple[str, str]:
    """(key, prefix)."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    ident = "".join(secrets.choice(alphabet) for _ in range(PREFIX_RANDOM_CHARS))
    prefix = f"{KEY_PREFIX}{ident}"
    return f"{prefix}_{secrets.token_urlsafe(32)}", prefix


def issue_api_key(session: Session, tenant_name: str) -> IssuedKey:
    """Creates the tenant if new and a key for it. The caller commits."""
    tenant, created = tenants_repo.get_or_create(session, tenant_name)
    key, prefix = generate_key()
    row = tenants_repo.add_api_key(session, tenant.id, prefix=prefix, key_hash=hash_key(key))
    return IssuedKey(
        key=key, prefix=prefix, key_id=row.id, tenant_id=tenant.id, tenant_created=created
    )


def authenticate(session: Session, authorization: str | None) -> CurrentTenant:
    """The tenant of a `Bearer` key, or AuthenticationError (401) naming what is wrong."""
    if not authorization:
        raise AuthenticationError(
            "missing API key: send the header 'Authorization: Bearer <key>' "
            "(create one with `gradhealth keys create --tenant NAME`)"
        )
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise AuthenticationError("the Authorization header must be 'Bearer <api key>'")
    found = tenants_repo.find_active_key(session, hash_key(key))
    if found is None:
        raise AuthenticationError("unknown or revoked API key")
    api_key, tenant = found
    return CurrentTenant(id=tenant.id, name=tenant.name, api_key_id=api_key.id)
