"""HTTP routers: thin layers over the ingest, query and detect services; no SQL here."""
