"""vmha node agent: one session per VM over its virtio-serial channel socket; heartbeat
monitoring; reporting to Prometheus, logs and OPNFV Doctor."""
