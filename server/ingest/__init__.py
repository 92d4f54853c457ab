"""Ingestion of agent batches: batch to rows, idempotency, the COPY fast path."""
