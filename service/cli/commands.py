"""Imports every command module so that each registers its commands on `app`."""

from __future__ import annotations

from service.cli import diagnose, keys, native, scheduler, server, submit, worker

__all__ = ["diagnose", "keys", "native", "scheduler", "server", "submit", "worker"]
