# Turnout as a container image.
#
#   docker build -t turnout:0.1.0 .
#   docker run --rm -p 8080:8080 \
#     -v "$PWD/my-turnout.yaml:/etc/turnout/turnout.yaml:ro" turnout:0.1.0
#
# The effective command is `turnout run -c /etc/turnout/turnout.yaml`; pass other
# arguments to run another subcommand (`docker run --rm turnout:0.1.0 check -c ...`).
#
# The built-in config (config/turnout.yaml) keeps the admin API on 127.0.0.1:9901:
# safe by default, and enough for the HEALTHCHECK below, which runs inside the
# container. To reach the admin API from outside the container (Kubernetes
# probes, Prometheus scrapes, `turnout status --admin ...`), your config must set
# `admin.listen: 0.0.0.0:9901` — see deploy/kubernetes/ — and then publish 9901
# only where it is safe to do so.
#
# Two stages: the first compiles the forwarding path with mypyc (setup.py) into a
# wheel, which needs a C compiler; the image itself gets only the wheel.
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proxy/ ./proxy/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --root-user-action=ignore /wheels/*.whl \
 && rm -rf /wheels

# A fixed, non-root uid/gid (10001), so volume permissions and Kubernetes'
# runAsNonRoot / runAsUser can rely on it. /etc/turnout belongs to that user
# because the state file (rollback latch) lives next to the config by default;
# the config file itself stays root-owned and read-only.
RUN groupadd --system --gid 10001 turnout \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin turnout \
 && install -d -o 10001 -g 10001 -m 0755 /etc/turnout
COPY config/turnout.yaml /etc/turnout/turnout.yaml
COPY config/cohorts/ /etc/turnout/cohorts/

WORKDIR /etc/turnout
EXPOSE 8080 9901
# Numeric, so Kubernetes can verify runAsNonRoot without a runAsUser of its own.
USER 10001:10001

HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2).status != 200)"]

# SIGTERM (docker stop) drains in-flight requests for up to limits.drain_timeout
# (20 s by default): give `docker stop -t` / terminationGracePeriodSeconds more.
STOPSIGNAL SIGTERM
ENTRYPOINT ["turnout"]
CMD ["run", "-c", "/etc/turnout/turnout.yaml"]
