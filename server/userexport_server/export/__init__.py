"""The export engine: field paths, the projection, columnar CSV/NDJSON formatting, gzip streaming.

polars allocates through its own jemalloc, which by default keeps freed pages
for seconds: at an export's pace of batches that kept about 50 MB more resident per running export
(bench/export_bench.py, peak RSS). Returning them at once must be configured before polars loads,
which importing anything of this package precedes; a value set in the environment wins."""
import os

os.environ.setdefault("_RJEM_MALLOC_CONF", "dirty_decay_ms:0,muzzy_decay_ms:0")
