"""The sidecar's own state database: idempotency records, send keys and embedded rate limits."""
