"""Where export files live: one interface, a local backend and a GCS backend."""
from userexport_server.storage.base import ObjectExistsError, ObjectWriter, Storage, object_key
from userexport_server.storage.factory import make_storage

__all__ = ["ObjectExistsError", "ObjectWriter", "Storage", "make_storage", "object_key"]
