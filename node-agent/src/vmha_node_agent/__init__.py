"""vmha node agent: one session per VM over its virtio-serial channel socket; heartbeat
monitoring; VM discovery and reporting through Kubernetes (Events, the VMI annotation, corrective
actions); Prometheus metrics, logs and OPNFV Doctor."""
