"""The REST API (FastAPI). `service.api.app.create_app(settings)` builds the application."""
