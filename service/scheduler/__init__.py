"""The scheduler (DESIGN.md): turns due schedules into diagnoses, one instance winning each
tick through the database (`due`), and delivers their webhooks (`webhooks`); `cron` reads the
expressions, `manage` is what the API's /v1/schedules does, `loop` runs it all every few
seconds. Submodules are imported directly: this package imports `service.api.operations`,
which the API's routers import in turn."""
