"""Runtime configuration: one `Settings`, read from `GRADHEALTH_*` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MAX_UPLOAD_BYTES = 2 * 1024**3  # 2 GiB: a large CNN/transformer checkpoint fits
DEFAULT_JOB_TIMEOUT_S = 600.0
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_LEASE_S = 60.0
# 1 MiB per `blob_chunks` row: few rows for a large checkpoint, small enough that a worker
# streaming a blob out of Postgres never holds more than one chunk per read.
DEFAULT_BLOB_CHUNK_BYTES = 1024 * 1024
DEFAULT_BLOB_CACHE_BYTES = 20 * 1024**3
SQLITE_FILE_NAME = "gradhealth.sqlite3"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GRADHEALTH_", extra="ignore")

    environment: str = Field(default="development", description="development | test | production")
    database_url: str | None = Field(
        default=None,
        description="postgresql+psycopg://... ; unset = embedded SQLite file in data_dir",
    )
    data_dir: Path = Path("./var")
    max_upload_bytes: int = Field(default=DEFAULT_MAX_UPLOAD_BYTES, gt=0)
    job_timeout_s: float = Field(default=DEFAULT_JOB_TIMEOUT_S, gt=0)
    max_attempts: int = Field(default=DEFAULT_MAX_ATTEMPTS, ge=1)
    lease_s: float = Field(default=DEFAULT_LEASE_S, gt=0)
    blob_storage: Literal["auto", "db", "file"] = Field(
        default="auto",
        description="where uploaded bytes live: db = chunks in Postgres/SQLite (workers elsewhere "
        "need only the database URL), file = under data_dir/blobs; auto = db on Postgres, file on "
        "the embedded SQLite",
    )
    blob_chunk_bytes: int = Field(default=DEFAULT_BLOB_CHUNK_BYTES, ge=1024)
    blob_cache_bytes: int = Field(
        default=DEFAULT_BLOB_CACHE_BYTES,
        ge=0,
        description="workers' local copies of database blobs (data_dir/blob-cache), LRU-evicted",
    )
    db_pool_size: int = Field(default=10, ge=1, description="database connections per process")
    auth_cache_ttl_s: float = Field(
        default=10.0,
        ge=0,
        description="how long an API process trusts a key it has checked (0: check every request); "
        "also the longest a revoked key keeps working",
    )

    @property
    def is_sqlite(self) -> bool:
        return self.effective_database_url.startswith("sqlite")

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / SQLITE_FILE_NAME).resolve()}"

    @property
    def effective_blob_storage(self) -> Literal["db", "file"]:
        if self.blob_storage != "auto":
            return self.blob_storage
        return "file" if self.is_sqlite else "db"

    @property
    def blob_dir(self) -> Path:
        return (self.data_dir / "blobs").resolve()

    @property
    def upload_tmp_dir(self) -> Path:
        # Uploads are spooled next to the blob dir so that the final rename stays on one device.
        return (self.data_dir / "tmp").resolve()

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        if self.environment == "production" and not self.database_url:
            raise ValueError(
                "GRADHEALTH_DATABASE_URL must point at Postgres "
                "when GRADHEALTH_ENVIRONMENT=production"
            )
        if self.environment == "production" and self.blob_storage == "file":
            raise ValueError(
                "GRADHEALTH_BLOB_STORAGE=file keeps uploads on one machine; use db (or auto) "
                "when GRADHEALTH_ENVIRONMENT=production so that remote workers can read them"
            )
        return self


ENV_PREFIX = "GRADHEALTH_"


def describe_settings_error(exc: ValidationError) -> list[str]:
    """One line per bad setting, named by its environment variable (GRADHEALTH_JOB_TIMEOUT_S,
    not pydantic's field name), with the value given and what is expected."""
    lines = []
    for error in exc.errors(include_url=False):
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        loc = error.get("loc") or ()
        if not loc:  # a check across settings: its message names the variables
            lines.append(message)
            continue
        variable = f"{ENV_PREFIX}{str(loc[0]).upper()}"
        value = error.get("input")
        given = f"={value!r}" if isinstance(value, (str, int, float)) else ""
        expected = message[0].lower() + message[1:] if message else "invalid value"
        lines.append(f"{variable}{given}: {expected}")
    return lines


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
