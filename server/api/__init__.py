"""HTTP routers: thin layers over the repository and ingest modules."""
