"""How the export's allocators give freed memory back, so that a server's peak RSS follows what its
exports hold rather than what they once held. Three allocators serve an export:

- polars' jemalloc (polars parses SQLite's chunks; it formatted every export's cells when this was
  measured) keeps freed pages for 10 s by default: at an export's pace of batches that kept about
  50 MB more resident per running export. 200 ms keeps what the next batches reuse: giving pages
  back at once (0 ms) made every batch fault fresh zeroed pages in, which cost a 1M-user CSV export
  9.2 server CPU-s against 6.2, for 13 MB less peak RSS (bench/export_bench.py). Told before polars
  loads (a value set in the environment wins).
- pyarrow's default pool, mimalloc, keeps what the Parquet writer, casts and concatenations freed:
  the system allocator instead took a 2-worker server's peak over a 300,000-user Parquet and CSV
  export from 297-316 MB to 267 MB (bench/export_bench.py). ARROW_DEFAULT_MEMORY_POOL, if set, wins.
- glibc raises its trim and mmap thresholds as large blocks are freed, and then keeps them in the
  heap; a fixed trim threshold returns them (267 -> 248-256 MB, same bench). Fixing it also fixes the
  mmap threshold, at 128 KiB unless told: then every deflate block (512 KiB, copied by igzip_threaded)
  and every write to storage was a fresh mmap, faulted in page by page and unmapped; at 1 MiB they
  come from the heap (a 1M-user CSV export in one process: 4.7-5.0 -> 4.2-4.7 CPU-s). Either
  variable set in the environment (MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_) wins; on a libc
  without mallopt nothing is changed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

_JEMALLOC_CONF = "dirty_decay_ms:200,muzzy_decay_ms:0"
# glibc's mallopt parameters, with the environment variable that sets each, and the value given.
_MALLOPT = {-1: ("MALLOC_TRIM_THRESHOLD_", 128 * 1024), -3: ("MALLOC_MMAP_THRESHOLD_", 1024 * 1024)}


def configure_allocators() -> None:
    """Before polars and pyarrow load: freed memory goes back to the system soon, not kept for later."""
    os.environ.setdefault("_RJEM_MALLOC_CONF", _JEMALLOC_CONF)
    # Read by Arrow's C++ the first time it needs its default pool, which every part of it uses
    # (pyarrow's set_memory_pool reaches only the calls made through pyarrow).
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if hasattr(libc, "mallopt"):
        for parameter, (variable, value) in _MALLOPT.items():
            if variable not in os.environ:
                libc.mallopt(parameter, value)
