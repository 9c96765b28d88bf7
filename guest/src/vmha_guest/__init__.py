"""vmha guest daemon: registers for heartbeating over a virtio-serial port, answers the
host's challenges with the health of configured checks, and serves the applications in the
VM on a unix socket: server group messaging and votes (`vmha_guest.client` is their
library).

Ships into VM images: depends on vmha-protocol and pyserial-asyncio only.
"""

__version__ = "0.1.0"
