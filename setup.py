"""What pyproject.toml cannot say outside an experimental table: the server's one piece of C
(export/_jsonpath.c, see export/json_path.py). Optional, so that the client alone installs where no
compiler is; the server then refuses to start and says why."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("userexport_server.export._jsonpath", ["server/userexport_server/export/_jsonpath.c"],
                             extra_compile_args=["-O2"], optional=True)])
