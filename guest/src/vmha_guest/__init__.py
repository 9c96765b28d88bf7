"""vmha guest daemon: registers for heartbeating over a virtio-serial port, answers the
host's challenges with the health of configured checks, and (later) relays server group
messages to local applications.

Ships into VM images: depends on vmha-protocol and pyserial-asyncio only.
"""

__version__ = "0.1.0"
