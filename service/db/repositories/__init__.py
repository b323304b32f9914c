"""Queries, one module per aggregate. Repositories never commit: the request or job boundary
does. Every function that reads client-visible rows takes `tenant_id` and filters by it."""
