"""Database models, engine creation and migrations."""
