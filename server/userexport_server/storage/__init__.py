"""Where export files live: one interface, a local backend and a GCS backend."""
