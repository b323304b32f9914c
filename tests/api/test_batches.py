from __future__ import annotations

import io

import numpy as np
from fastapi.testclient import TestClient

from tests.api.conftest import Samples
from tests.api.helpers import upload_batch
from tests.conftest import Backend, TenantKey, make_client


def test_npz_arrays_are_listed(client: TestClient, samples: Samples) -> None:
    response = upload_batch(client, samples.npz)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["format"] == "npz"
    assert body["filename"] == "batch.npz"
    assert body["arrays"] == [
        {"name": "x", "shape": [2, 4], "dtype": "float32"},
        {"name": "target", "shape": [2], "dtype": "int64"},
    ]
    assert body["arrays_complete"] is True


def test_safetensors_and_pt_are_listed_without_loading(
    client: TestClient, samples: Samples
) -> None:
    st = upload_batch(client, samples.safetensors, "b.bin").json()
    assert st["format"] == "safetensors"
    assert {a["name"]: a["dtype"] for a in st["arrays"]} == {"x": "float32", "labels": "int64"}
    pt = upload_batch(client, samples.pt_batch, "b.bin").json()
    assert pt["format"] == "pt"
    assert pt["arrays"] == [
        {"name": "x", "shape": [2, 4], "dtype": "float32"},
        {"name": "target", "shape": [2], "dtype": "int64"},
    ]


def test_a_pt_that_needs_more_than_tensors_is_accepted_unlisted(client: TestClient) -> None:
    import torch

    buffer = io.BytesIO()
    torch.save({"x": torch.zeros(2), "note": torch.Size([3])}, buffer)
    body = upload_batch(client, buffer.getvalue(), "b.pt").json()
    assert body["format"] == "pt"
    assert (body["arrays"], body["arrays_complete"]) == ([], False)


def test_a_pickle_that_would_run_code_is_never_executed(
    client: TestClient, tmp_path: object
) -> None:
    import os
    import pickle
    import zipfile

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, ("touch /tmp/gradhealth-pwned",))

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"x": Evil()}))
    body = upload_batch(client, buffer.getvalue(), "b.pt").json()
    assert body["arrays_complete"] is False
    assert not os.path.exists("/tmp/gradhealth-pwned")


def test_object_arrays_and_garbage_are_422(client: TestClient) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.array([{"a": 1}], dtype=object))
    objects = upload_batch(client, buffer.getvalue())
    assert objects.status_code == 422
    assert objects.json()["error"]["code"] == "bad_batch"
    assert "'x'" in objects.json()["error"]["message"]
    garbage = upload_batch(client, b"not a batch, clearly")
    assert garbage.status_code == 422
    assert ".npz" in garbage.json()["error"]["message"]


def test_a_very_long_file_name_is_shortened(client: TestClient, samples: Samples) -> None:
    response = upload_batch(client, samples.npz, "b" * 900 + ".npz")
    assert response.status_code == 201
    assert len(response.json()["filename"]) == 500


def test_batch_past_the_limit_is_413(backend: Backend, tenant: TenantKey, samples: Samples) -> None:
    with make_client(backend, max_upload_bytes=100) as client:
        client.headers.update(tenant.headers)
        assert upload_batch(client, samples.npz).status_code == 413


def test_get_batch_and_cross_tenant_404(
    client: TestClient, backend: Backend, other_tenant: TenantKey, samples: Samples
) -> None:
    batch_id = upload_batch(client, samples.npz).json()["id"]
    assert client.get(f"/v1/batches/{batch_id}").status_code == 200
    with make_client(backend) as other:
        assert other.get(f"/v1/batches/{batch_id}", headers=other_tenant.headers).status_code == 404
