"""Runtime configuration: one `Settings`, read from `GRADHEALTH_*` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MAX_UPLOAD_BYTES = 2 * 1024**3  # 2 GiB: a large CNN/transformer checkpoint fits
DEFAULT_JOB_TIMEOUT_S = 600.0
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_LEASE_S = 60.0


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GRADHEALTH_", extra="ignore")

    environment: str = Field(default="development", description="development | test | production")
    database_url: str | None = Field(default=
        None, description="postgresql+psycopg://... ; unset = embedded SQLite file in data_dir"
    )
    data_dir: Path = Path("./var")
    max_upload_bytes: int = Field(default=DEFAULT_MAX_UPLOAD_BYTES, gt=0)
    job_timeout_s: float = Field(default=DEFAULT_JOB_TIMEOUT_S, gt=0)
    max_attempts: int = Field(default=DEFAULT_MAX_ATTEMPTS, ge=1)
    lease_s: float = Field(default=DEFAULT_LEASE_S, gt=0)

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'gradhealth.sqlite3').resolve()}"

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        if self.environment == "production" and not self.database_url:
            raise ValueError(
                "GRADHEALTH_DATABASE_URL must point at Postgres "
                "when GRADHEALTH_ENVIRONMENT=production"
            )
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
