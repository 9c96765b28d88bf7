"""Size and range limits of the wire protocol (PROTOCOL.md §2, §4, §5)."""

from typing import Final

# Framing: the largest legal message is a broadcast of 3050 bytes plus its envelope;
# 8 KiB leaves room for JSON escaping without letting a guest make us buffer much.
MAX_FRAME_BYTES: Final = 8 * 1024

# Base layer.
BASE_VERSION: Final = 1

# Heartbeat application layer, message-definition version 3 revision 1.
HEARTBEAT_VERSION: Final = 3
HEARTBEAT_REVISION: Final = 1
HEARTBEAT_MAX_VALUE_BYTES: Final = 32
HEARTBEAT_MAX_NAME_BYTES: Final = 64
HEARTBEAT_MAX_LOG_BYTES: Final = 224
HEARTBEAT_MIN_MSG_BYTES: Final = 32
HEARTBEAT_MAX_MSG_BYTES: Final = 1056
# A challenge is an unsigned 32-bit random number in the original.
HEARTBEAT_MAX_CHALLENGE: Final = 2**32 - 1
# Sequence numbers and invocation ids are per-sender counters; bound them so a guest
# cannot hand us arbitrarily large integers.
MAX_COUNTER: Final = 2**63 - 1
# Interval and notice limits a guest may ask for; the agent clamps further.
HEARTBEAT_MAX_INTERVAL_MS: Final = 24 * 3600 * 1000
HEARTBEAT_MAX_NOTICE_SECS: Final = 24 * 3600

# Server group application layer.
SERVER_GROUP_VERSION: Final = 1
SERVER_GROUP_NACK_VERSION: Final = 2
MAX_BROADCAST_BYTES: Final = 3050
MAX_SOURCE_INSTANCE_BYTES: Final = 253
SERVER_GROUP_MAX_LOG_BYTES: Final = 224
