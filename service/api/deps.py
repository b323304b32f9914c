"""FastAPI dependencies as `Annotated` aliases: `SessionDep`, `TenantDep`,
`SettingsDep`, `StoreDep`, `DatabaseDep`.

`SessionDep` gives one session per request and closes it. Endpoints, the request boundary,
wrap their work in `with session.begin():` (commit on success, rollback on error) and build the
response inside it: the pooled connection then goes back before FastAPI serialises the response
in a threadpool thread. (Holding it across that step deadlocks under load: every thread can be
waiting for a connection while every connection waits for a thread to serialise its response.)
The session connects lazily: streaming upload endpoints take no `SessionDep` and open a session
only once the body is stored.
`TenantDep` is the key's tenant (401 otherwise); the bearer scheme is declared so the /docs page
shows an "Authorize" button.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, TypeVar

import anyio
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.auth import CurrentTenant, authenticate, hash_key
from service.config import Settings
from service.db.session import Database
from service.storage import BlobStore

T = TypeVar("T")
CLOSE_THREADS = 4
AUTH_CACHE_TTL_S = 10.0
AUTH_CACHE_ENTRIES = 10_000
bearer_scheme = HTTPBearer(
    auto_error=False,
    description="an API key from `gradhealth keys create --tenant NAME` "
    "(or the one `gradhealth serve` prints on first start)",
)


# The accessors are `async def` on purpose: FastAPI runs a plain `def` dependency in a
# threadpool thread, a hop per request for a dictionary lookup.
async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_database(request: Request) -> Database:
    database: Database = request.app.state.database
    return database


async def get_store(request: Request) -> BlobStore:
    store: BlobStore = request.app.state.blob_store
    return store


DatabaseDep = Annotated[Database, Depends(get_database)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[BlobStore, Depends(get_store)]


async def get_session(database: DatabaseDep, request: Request) -> AsyncIterator[Session]:
    # GET/HEAD promise no writes: on SQLite their transactions take no write lock.
    session = database.new_session(read_only=request.method in ("GET", "HEAD"))
    try:
        yield session
    finally:
        # Closing returns the connection to the pool. It runs on a limiter of its own: were
        # it queued behind the request threads (which may all be waiting for a pooled
        # connection), no connection would ever come back (pool exhaustion deadlock).
        await anyio.to_thread.run_sync(session.close, limiter=_close_limiter(request))


def _close_limiter(request: Request) -> anyio.CapacityLimiter:
    limiter: anyio.CapacityLimiter | None = getattr(request.app.state, "close_limiter", None)
    if limiter is None:
        limiter = request.app.state.close_limiter = anyio.CapacityLimiter(CLOSE_THREADS)
    return limiter


SessionDep = Annotated[Session, Depends(get_session)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]


def _header(credentials: HTTPAuthorizationCredentials | None, request: Request) -> str | None:
    if credentials is not None:
        return f"{credentials.scheme} {credentials.credentials}"
    return request.headers.get("authorization")


def _authenticate(database: Database, header: str | None) -> CurrentTenant:
    # A short session of its own, closed before this thread gives its slot back: sharing the
    # request's session would keep a connection checked out across thread hops (see above).
    # It also keeps upload endpoints from holding a connection while a body streams in.
    with database.session(read_only=True) as session:
        return authenticate(session, header)


async def get_tenant(
    database: DatabaseDep, credentials: Credentials, request: Request
) -> CurrentTenant:
    header = _header(credentials, request)
    cache: AuthCache = request.app.state.auth_cache
    tenant = cache.get(header)
    if tenant is None:
        tenant = await run_in_threadpool(_authenticate, database, header)
        cache.put(header, tenant)
    return tenant


TenantDep = Annotated[CurrentTenant, Depends(get_tenant)]


class AuthCache:
    """Valid keys seen in the last `ttl_s` seconds → their tenant, so that a client polling a
    diagnosis costs no key lookup per request. Keyed by the key's sha256 (no plain keys kept);
    failures are never cached. A revoked key keeps working for at most `ttl_s` in a process
    that saw it just before."""

    def __init__(self, ttl_s: float = AUTH_CACHE_TTL_S, max_entries: int = AUTH_CACHE_ENTRIES):
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, CurrentTenant]] = {}

    def get(self, header: str | None) -> CurrentTenant | None:
        if not header or self.ttl_s <= 0:
            return None
        hit = self._entries.get(hash_key(header))
        if hit is None or hit[0] < time.monotonic():
            return None
        return hit[1]

    def put(self, header: str | None, tenant: CurrentTenant) -> None:
        if not header or self.ttl_s <= 0:
            return
        if len(self._entries) >= self.max_entries:
            self._entries.clear()  # crude but bounded; a miss only costs one lookup
        self._entries[hash_key(header)] = (time.monotonic() + self.ttl_s, tenant)


async def in_read_session(database: Database, work: Callable[[Session], T]) -> T:
    """`work(session)` in a read-only session, in ONE threadpool hop, for async endpoints: the
    session is closed before the response is serialised (in the event loop). The polling
    endpoints use it: a sync endpoint costs three hops (dependency, endpoint, serialisation)."""

    def run() -> T:
        with database.session(read_only=True) as session:
            return work(session)

    return await run_in_threadpool(run)
