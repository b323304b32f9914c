"""Persistence: SQLAlchemy 2 models, engine/session setup, one repository module per aggregate."""
