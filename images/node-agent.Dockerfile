# syntax=docker/dockerfile:1
# The vmha node agent (the chart's DaemonSet). Build from the repository root:
#   docker build -f images/node-agent.Dockerfile -t vmha/node-agent:dev .
# vmha-protocol is not on PyPI: it is installed from this tree with the agent.
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/vmha
COPY protocol /src/protocol
COPY node-agent /src/node-agent
RUN /opt/vmha/bin/pip install /src/protocol /src/node-agent

FROM ${PYTHON_IMAGE}
COPY --from=build /opt/vmha /opt/vmha
ENV PATH=/opt/vmha/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# Runs as root with only CAP_DAC_OVERRIDE (the chart's securityContext): QEMU's channel
# sockets belong to uid 107 and are not writable by others (docs/install.md, "Security").
# 9810: /metrics, /healthz, /readyz.
EXPOSE 9810
ENTRYPOINT ["vmha-node-agent"]
