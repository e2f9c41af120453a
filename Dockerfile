# Container image of the mailcow send API sidecar.
#
#   docker build -t mailcow-smtp-api:local .
#   docker run --rm mailcow-smtp-api:local --help
#
# Every option of `twistd smtpapi` is also read from SMTPAPI_<OPTION> in the environment
# (see README.md); arguments given after the image name are appended to the entry point.
# docs/deploy.md shows how to run it beside mailcow-dockerized.

FROM python:3.11-slim

# No .pyc files in the image layers, unbuffered log lines, no pip cache or version check.
# SSL_CERT_FILE: the system CA bundle (Debian's ca-certificates, in the base image) is what
# verifies postfix's public certificate when --smtp-ca is not given; named explicitly because
# the OpenSSL inside the cryptography wheel has other compiled-in default paths.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt

# Only setup.py, constraints.txt (the tested versions) and src/ are needed, and the only paths
# .dockerignore lets through.
COPY setup.py /tmp/build/setup.py
COPY constraints.txt /tmp/build/constraints.txt
COPY src /tmp/build/src

# Install the package and its twistd plugin dropin, then build Twisted's plugin cache once as
# root: at run time site-packages is read-only for the service user, and twistd would otherwise
# try (and fail) to write twisted/plugins/dropin.cache on every start.
RUN pip install --no-cache-dir --constraint /tmp/build/constraints.txt /tmp/build \
    && rm -rf /tmp/build \
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && python -c "from twisted.plugin import IPlugin, getPlugins; assert any(getattr(p, 'tapname', '') == 'smtpapi' for p in getPlugins(IPlugin))"

# A fixed, unprivileged user; its home is the working directory, where the embedded SQLite
# database (--db sqlite:smtpapi.sqlite, the default when mailcow's DBNAME is not set) lives.
RUN groupadd --system --gid 10001 smtpapi \
    && useradd --system --uid 10001 --gid smtpapi --home-dir /var/lib/smtpapi --create-home \
       --shell /usr/sbin/nologin smtpapi
WORKDIR /var/lib/smtpapi
USER smtpapi

# Inside a container the service must listen on the container's own interfaces; who can reach
# it is decided by the container network (no published port in deploy/docker-compose.override.yml).
ENV SMTPAPI_LISTEN=tcp:8080
EXPOSE 8080

# GET /healthz answers 200 without authentication. http.client rather than urllib: urllib
# would route the probe through an HTTP_PROXY from the environment. slim images have no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import http.client; c = http.client.HTTPConnection('127.0.0.1', 8080, timeout=4); c.request('GET', '/healthz'); raise SystemExit(c.getresponse().status != 200)"]

# -n: stay in the foreground and log to stdout (docker logs). --pidfile= (empty): no pid file.
# The process gets the same small pid in every fresh start of the container, so a pid file left
# behind by a killed container would name a "running" server and twistd would refuse to start.
ENTRYPOINT ["twistd", "-n", "--pidfile=", "smtpapi"]
