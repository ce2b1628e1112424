# nxlink-openapi-proxy: the gateway as a container image.
#
#   docker build -t nxlink-openapi-proxy .
#   docker run --rm -p 8001:8001 \
#     -e EXTERNAL_API_KEY_1_FILE=/run/secrets/tenant_1_api_key ... nxlink-openapi-proxy
#
# Configuration comes only from the environment and from mounted files named by
# NAME_FILE variables (see deploy/); nothing secret is baked into the image.
# tests/test_container.py runs this file's ENTRYPOINT and HEALTHCHECK as plain commands.

FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY proxy ./proxy

# Build a wheel first so the runtime venv holds an installed package, not a source tree;
# constraints.txt pins every dependency to the versions make test last passed with.
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install -c constraints.txt /wheels/*.whl \
    && /opt/venv/bin/pip uninstall --yes pip setuptools


FROM python:3.11-slim

ENV PATH="/opt/venv/bin:$PATH" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8001

RUN groupadd --system --gid 10001 nxlink \
    && useradd --system --no-log-init --uid 10001 --gid nxlink \
       --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin nxlink

COPY --from=builder /opt/venv /opt/venv

# An empty working directory: no stray .env is read unless one is mounted here on purpose.
WORKDIR /srv/nxlink
USER 10001:10001

EXPOSE 8001
STOPSIGNAL SIGTERM

# No curl in a slim image: the venv's Python asks /healthz on loopback (proxies ignored) and
# exits non-zero on a refused connection, a timeout or any status but 200. With TLS_CERT_FILE
# set it speaks HTTPS without checking the certificate: it only asks its own process.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/opt/venv/bin/python", "-c", "import http.client as h, os, ssl; p = int(os.environ.get('PORT', '8001')); t = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); t.check_hostname = False; t.verify_mode = ssl.CERT_NONE; c = h.HTTPSConnection('127.0.0.1', p, timeout=3, context=t) if os.environ.get('TLS_CERT_FILE') else h.HTTPConnection('127.0.0.1', p, timeout=3); c.request('GET', '/healthz'); raise SystemExit(c.getresponse().status != 200)"]

ENTRYPOINT ["/opt/venv/bin/nxlink-proxy", "serve"]
