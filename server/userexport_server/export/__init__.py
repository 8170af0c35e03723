"""The export engine: field paths, request validation, SQL compilation, CSV/NDJSON + gzip streaming."""
