# Multi-stage: build wheels with the full toolchain, ship only the runtime on a slim base.
FROM python:3.11-slim AS build
WORKDIR /src
# A C compiler and Python's headers for the server's one C module (setup.py); the official image has
# the headers, a Debian-made stand-in (scripts/image.sh) gets them from python3-dev. Unpinned: this
# stage's tools leave no trace in the image; the substitution is one word or none, so unquoted.
# hadolint ignore=DL3008,SC2046
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
      $(python3 -c 'import os, sysconfig; print("" if os.path.exists(sysconfig.get_path("include") + "/Python.h") else "python3-dev")') \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml setup.py README.md ./
COPY client ./client
COPY server ./server
# The server extra: a client-only `pip install userexport` leaves out the database and storage stack.
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[server]'

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin userexport
# Every wheel the build stage made for '.[server]', and nothing from an index. They are bind-mounted
# from the build stage for this one step, so no layer of the image holds them (a COPY and then `rm`
# would leave them in the COPY's layer); tests/integration/test_container.py checks that.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels /wheels/*.whl
USER 10001
WORKDIR /home/userexport
# The data directory exists in the image, owned by the server's user: a named volume mounted on it
# (`docker run -v userexport-data:/home/userexport/data`) starts as a copy of it, so the server can
# write there; a folder the engine made for the volume would belong to root.
RUN mkdir -m 700 data
# Configuration is by environment (see docs/configuration.md); these make the container reachable.
ENV USEREXPORT_LISTEN=0.0.0.0:50051 \
    USEREXPORT_FILES_LISTEN=0.0.0.0:50052 \
    USEREXPORT_METRICS_LISTEN=0.0.0.0:9464 \
    USEREXPORT_DATA_DIR=/home/userexport/data \
    PYTHONUNBUFFERED=1
EXPOSE 50051 50052 9464
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 CMD ["userexport-server", "health"]
ENTRYPOINT ["userexport-server"]
CMD ["serve"]
