"""vmha operator (kopf): the VMGroup CRD, placement by server group policy, admission, the
virtio-serial channel hook and VMGroup status. Run it as `vmha-operator`; see docs/operator.md."""
