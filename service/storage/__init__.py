"""Uploads and the content-addressed blob store (see `blobs` for the API workers use)."""

from service.storage.blobs import BlobNotFoundError, BlobStore, StoredBlob
from service.storage.spool import SpooledUpload

__all__ = ["BlobNotFoundError", "BlobStore", "SpooledUpload", "StoredBlob"]
