from __future__ import annotations

import httpx
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.auth import hash_key
from service.db.models import ApiKey
from service.db.repositories import tenants as tenants_repo
from tests.conftest import Backend, TenantKey, make_client


def _error(response: httpx.Response) -> dict[str, str]:
    error: dict[str, str] = response.json()["error"]
    return error


def test_missing_key_is_401_with_a_hint(backend: Backend) -> None:
    with make_client(backend) as client:
        response = client.get("/v1/diagnoses")
    assert response.status_code == 401
    assert _error(response)["code"] == "unauthorized"
    assert "gradhealth keys create" in _error(response)["message"]
    assert response.headers["www-authenticate"] == "Bearer"


def test_unknown_key_and_wrong_scheme_are_401(backend: Backend, tenant: TenantKey) -> None:
    with make_client(backend) as client:
        unknown = client.get("/v1/diagnoses", headers={"Authorization": "Bearer gh_nope_nope"})
        basic = client.get("/v1/diagnoses", headers={"Authorization": f"Basic {tenant.key}"})
    assert unknown.status_code == 401
    assert _error(unknown)["message"] == "unknown or revoked API key"
    assert basic.status_code == 401


def test_a_valid_key_is_accepted_and_stored_only_hashed(
    client: TestClient, backend: Backend, tenant: TenantKey
) -> None:
    assert client.get("/v1/diagnoses").status_code == 200
    with backend.database.session() as session:
        row = session.scalar(select(ApiKey).where(ApiKey.tenant_id == tenant.tenant_id))
        assert row is not None
        assert row.key_hash == hash_key(tenant.key) != tenant.key
        assert tenant.key.startswith(row.prefix + "_")


def test_revoked_key_is_401(backend: Backend, tenant: TenantKey) -> None:
    with backend.database.session() as session:
        key = session.scalar(select(ApiKey).where(ApiKey.tenant_id == tenant.tenant_id))
        assert key is not None
        assert tenants_repo.revoke_key(session, tenant.tenant_id, key.id)
        session.commit()
    with make_client(backend) as client:
        assert client.get("/v1/diagnoses", headers=tenant.headers).status_code == 401
