"""Jobs: the immutable job value, the store that owns every job query, events, and the workers."""
