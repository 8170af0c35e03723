"""Export tests run against every database backend (see support.engine)."""
from tests.export.support import engine  # noqa: F401  (the fixture)
