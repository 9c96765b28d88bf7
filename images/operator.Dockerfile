# syntax=docker/dockerfile:1
# The vmha operator (kopf). Build from the repository root:
#   docker build -f images/operator.Dockerfile -t vmha/operator:dev .
# vmha-protocol is not on PyPI: it is installed from this tree with the operator.
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/vmha
COPY protocol /src/protocol
COPY operator /src/operator
RUN /opt/vmha/bin/pip install /src/protocol /src/operator

FROM ${PYTHON_IMAGE}
COPY --from=build /opt/vmha /opt/vmha
ENV PATH=/opt/vmha/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# Any unprivileged user: the operator only talks to the apiserver and serves its webhooks.
USER 65532:65532
# 9443: admission webhooks (HTTPS); 8080: kopf's liveness endpoint.
EXPOSE 9443 8080
ENTRYPOINT ["vmha-operator"]
