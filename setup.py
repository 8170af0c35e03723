"""What pyproject.toml cannot say outside an experimental table: the server's C modules
(export/_jsonpath.c, see export/json_path.py; export/_cells.c, see export/cells.py). Optional, so
that the client alone installs where no compiler is; the server then refuses to start and says why."""
from setuptools import Extension, setup

setup(ext_modules=[Extension(f"userexport_server.export.{name}", [f"server/userexport_server/export/{name}.c"],
                             depends=["server/userexport_server/export/_json_text.h"], extra_compile_args=["-O2"],
                             optional=True) for name in ("_jsonpath", "_cells")])
