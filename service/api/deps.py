"""FastAPI dependencies as `Annotated` aliases: `SessionDep`, `TenantDep`, `SettingsDep`,
`StoreDep`, `DatabaseDep`.

`SessionDep` gives one session per request and closes it (rolling back anything uncommitted);
endpoints, the request boundary, commit. Streaming upload endpoints take no `SessionDep`: they
open a session only once the body is stored. `TenantDep` is the key's tenant (401 otherwise); the
bearer scheme is declared so the /docs page shows an "Authorize" button.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service.auth import CurrentTenant, authenticate
from service.config import Settings
from service.db.session import Database
from service.storage import BlobStore

bearer_scheme = HTTPBearer(
    auto_error=False,
    description="an API key from `gradhealth keys create --tenant NAME` "
    "(or the one `gradhealth serve` prints on first start)",
)


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_database(request: Request) -> Database:
    database: Database = request.app.state.database
    return database


def get_store(request: Request) -> BlobStore:
    store: BlobStore = request.app.state.blob_store
    return store


DatabaseDep = Annotated[Database, Depends(get_database)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[BlobStore, Depends(get_store)]


def get_session(database: DatabaseDep) -> Iterator[Session]:
    with database.session() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_tenant(
    database: DatabaseDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    request: Request,
) -> CurrentTenant:
    # Its own short session, not SessionDep: an upload endpoint must not hold a database
    # connection (or, on SQLite, the write lock) while a large body streams in.
    header = request.headers.get("authorization")
    if credentials is not None:
        header = f"{credentials.scheme} {credentials.credentials}"
    with database.session() as session:
        return authenticate(session, header)


TenantDep = Annotated[CurrentTenant, Depends(get_tenant)]
