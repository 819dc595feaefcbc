# syntax=docker/dockerfile:1
# The same `serve` command as `make run`, as a non-root user, with the pinned dependencies.

# Both stages must use the same Python: the virtualenv copied below links to its interpreter.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
COPY requirements.lock /tmp/requirements.lock
# Exactly the lock: nothing unpinned is pulled in, and a lock missing a dependency fails here.
RUN /opt/venv/bin/pip install --no-deps -r /tmp/requirements.lock && /opt/venv/bin/pip check

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/srv \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CONNECTORS_HOST=0.0.0.0 \
    CONNECTORS_PORT=8000 \
    CONNECTORS_DATA_DIR=/var/lib/connectors
RUN groupadd --system --gid 10001 connectors \
    && useradd --system --uid 10001 --gid connectors --home-dir /srv --shell /usr/sbin/nologin connectors \
    && mkdir -p /var/lib/connectors && chown connectors:connectors /var/lib/connectors
COPY --from=build /opt/venv /opt/venv
WORKDIR /srv
COPY --chown=root:root app ./app
COPY --chown=root:root alembic ./alembic
USER connectors
EXPOSE 8000
VOLUME ["/var/lib/connectors"]
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os,urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('CONNECTORS_PORT','8000')}/healthz\", timeout=2)"]
# Run `python -m app migrate` once per release (as a job or init container) before serving.
ENTRYPOINT ["python", "-m", "app"]
CMD ["serve"]
