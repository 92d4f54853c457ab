"""The web UI and the offline API docs: static files served next to the API (an HTTP layer)."""
