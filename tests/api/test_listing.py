"""GET /v1/models and GET /v1/batches: newest first, keyset pages, tenant-filtered."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from service.db.models import BatchRecord, ModelRecord
from tests.api.conftest import Samples
from tests.api.helpers import upload_batch, upload_model
from tests.conftest import Backend, TenantKey, make_client


def all_pages(client: TestClient, path: str, **params: Any) -> tuple[list[str], int]:
    """Every id the list hands out following next_cursor, and the number of pages read."""
    seen: list[str] = []
    cursor, pages = None, 0
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = client.get(path, params=query)
        assert response.status_code == 200, response.text
        body = response.json()
        assert len(body["items"]) <= params.get("limit", 50)
        seen += [item["id"] for item in body["items"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            return seen, pages


def uploaded_models(client: TestClient, samples: Samples, names: list[str]) -> list[str]:
    ids = []
    for name in names:
        response = upload_model(client, samples.onnx, name=name)
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    return ids


def uploaded_batches(client: TestClient, samples: Samples, count: int) -> list[str]:
    ids = []
    for i in range(count):
        response = upload_batch(client, samples.npz, filename=f"b{i}.npz")
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    return ids


def test_models_list_newest_first_with_the_full_body(client: TestClient, samples: Samples) -> None:
    made = uploaded_models(client, samples, ["net", "other", "net"])
    body = client.get("/v1/models").json()
    assert [m["id"] for m in body["items"]] == list(reversed(made))
    assert body["next_cursor"] is None
    newest = body["items"][0]
    assert newest == client.get(f"/v1/models/{made[-1]}").json()
    assert (newest["name"], newest["version"]) == ("net", 2)


def test_models_pages_have_no_duplicates_or_gaps(client: TestClient, samples: Samples) -> None:
    made = uploaded_models(client, samples, ["net", "other", "net", "other", "net"])
    seen, pages = all_pages(client, "/v1/models", limit=2)
    assert seen == list(reversed(made))
    assert pages == 3


def test_a_model_uploaded_while_paging_does_not_shift_later_pages(
    client: TestClient, samples: Samples
) -> None:
    made = uploaded_models(client, samples, ["a", "b", "c", "d"])
    first = client.get("/v1/models", params={"limit": 2}).json()
    uploaded_models(client, samples, ["e"])  # newer than every listed row: on no later page
    rest = client.get("/v1/models", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    seen = [m["id"] for m in first["items"] + rest["items"]]
    assert seen == list(reversed(made))


def test_rows_created_in_the_same_instant_are_each_listed_once(
    client: TestClient, backend: Backend, samples: Samples
) -> None:
    # Ties on created_at are broken by id; without that, a page boundary inside the tie
    # would skip or repeat rows.
    made = uploaded_models(client, samples, ["net"] * 5)
    batches = uploaded_batches(client, samples, 5)
    with backend.database.session() as session:
        instant = session.get(ModelRecord, made[0]).created_at  # type: ignore[union-attr]
        session.execute(update(ModelRecord).values(created_at=instant))
        session.execute(update(BatchRecord).values(created_at=instant))
        session.commit()
    seen, _ = all_pages(client, "/v1/models", limit=2)
    assert seen == sorted(made, reverse=True)
    seen, _ = all_pages(client, "/v1/batches", limit=2)
    assert seen == sorted(batches, reverse=True)


def test_name_filter_lists_every_version_of_that_name_only(
    client: TestClient, samples: Samples
) -> None:
    made = uploaded_models(client, samples, ["net", "net-v2", "net", "NET", "net"])
    seen, _ = all_pages(client, "/v1/models", name="net", limit=2)
    assert seen == [made[4], made[2], made[0]]
    versions = [
        m["version"] for m in client.get("/v1/models", params={"name": "net"}).json()["items"]
    ]
    assert versions == [3, 2, 1]
    assert client.get("/v1/models", params={"name": "ne"}).json()["items"] == []


def test_batches_list_and_pages(client: TestClient, samples: Samples) -> None:
    made = uploaded_batches(client, samples, 5)
    body = client.get("/v1/batches").json()
    assert [b["id"] for b in body["items"]] == list(reversed(made))
    assert body["items"][0]["filename"] == "b4.npz"
    assert body["items"][0]["arrays"] == client.get(f"/v1/batches/{made[-1]}").json()["arrays"]
    seen, pages = all_pages(client, "/v1/batches", limit=2)
    assert seen == list(reversed(made))
    assert pages == 3


def test_another_tenants_models_and_batches_are_never_listed(
    client: TestClient, backend: Backend, other_tenant: TenantKey, samples: Samples
) -> None:
    mine_models = uploaded_models(client, samples, ["net", "net"])
    mine_batches = uploaded_batches(client, samples, 2)
    with make_client(backend) as other:
        other.headers.update(other_tenant.headers)
        theirs_models = uploaded_models(other, samples, ["net"])
        theirs_batches = uploaded_batches(other, samples, 1)
        assert all_pages(other, "/v1/models", limit=1)[0] == theirs_models
        assert all_pages(other, "/v1/models", name="net")[0] == theirs_models
        assert all_pages(other, "/v1/batches", limit=1)[0] == theirs_batches
        # My cursor on their list resumes within their rows only.
        my_cursor = client.get("/v1/models", params={"limit": 1}).json()["next_cursor"]
        resumed = other.get("/v1/models", params={"cursor": my_cursor}).json()["items"]
        assert {m["id"] for m in resumed} <= set(theirs_models)
    assert all_pages(client, "/v1/models", limit=1)[0] == list(reversed(mine_models))
    assert all_pages(client, "/v1/batches", limit=1)[0] == list(reversed(mine_batches))


@pytest.mark.parametrize("path", ["/v1/models", "/v1/batches"])
def test_listing_without_a_key_is_401(backend: Backend, path: str) -> None:
    with make_client(backend) as anonymous:
        response = anonymous.get(path)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"


@pytest.mark.parametrize("path", ["/v1/models", "/v1/batches"])
def test_bad_cursor_or_limit_is_422(client: TestClient, path: str) -> None:
    bad_cursor = client.get(path, params={"cursor": "!!"})
    assert bad_cursor.status_code == 422
    assert "next_cursor" in bad_cursor.json()["error"]["message"]
    # Valid base64, but not a cursor this API wrote.
    assert client.get(path, params={"cursor": "bm90LWpzb24"}).status_code == 422
    for limit in (0, 201, "many"):
        assert client.get(path, params={"limit": limit}).status_code == 422, limit
