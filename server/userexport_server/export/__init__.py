"""The export engine: field paths, the projection, columnar CSV/NDJSON formatting, gzip streaming.

Importing anything of this package configures the allocators first (memory.py), as polars reads its
allocator's configuration when it loads."""
from userexport_server.export.memory import configure_allocators

configure_allocators()
