"""The HTTP shell: Klein routes, request limits, rendering, logs and metrics."""
