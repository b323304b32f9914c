"""Tenants and their API keys."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import ApiKey, Tenant, utcnow


def get_by_name(session: Session, name: str) -> Tenant | None:
    return session.scalar(select(Tenant).where(Tenant.name == name))


def get_or_create(session: Session, name: str) -> tuple[Tenant, bool]:
    """The tenant called `name`, and whether it was created now."""
    tenant = get_by_name(session, name)
    if tenant is not None:
        return tenant, False
    tenant = Tenant(name=name)
    session.add(tenant)
    session.flush()
    return tenant, True


def add_api_key(session: Session, tenant_id: str, *, prefix: str, key_hash: str) -> ApiKey:
    key = ApiKey(tenant_id=tenant_id, prefix=prefix, key_hash=key_hash)
    session.add(key)
    session.flush()
    return key


def find_active_key(session: Session, key_hash: str) -> tuple[ApiKey, Tenant] | None:
    row = session.execute(
        select(ApiKey, Tenant)
        .join(Tenant, Tenant.id == ApiKey.tenant_id)
        .where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
    ).first()
    return (row[0], row[1]) if row is not None else None


def revoke_key(session: Session, tenant_id: str, key_id: str) -> bool:
    key = session.scalar(select(ApiKey).where(ApiKey.id == key_id, ApiKey.tenant_id == tenant_id))
    if key is None or key.revoked_at is not None:
        return False
    key.revoked_at = utcnow()
    return True


def count_keys(session: Session) -> int:
    return len(session.scalars(select(ApiKey.id)).all())
