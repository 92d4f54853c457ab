"""gradwatch server: FastAPI app, storage, Prometheus metrics. Never imported by the agent."""
