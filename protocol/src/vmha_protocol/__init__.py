"""vmha wire protocol: framing, base layer, heartbeat and server group messages.

No I/O here: the node agent, the guest daemon and the tests all build on these types.
"""

from vmha_protocol.addresses import AppGroup, default_address, group_of
from vmha_protocol.codec import (
    GuestMessage,
    HostMessage,
    Inbound,
    decode_canonical_heartbeat,
    decode_from_guest,
    decode_from_host,
    encode,
)
from vmha_protocol.errors import ProtocolError
from vmha_protocol.framing import DecoderStats, FrameDecoder, encode_frame

__all__ = [
    "AppGroup",
    "DecoderStats",
    "FrameDecoder",
    "GuestMessage",
    "HostMessage",
    "Inbound",
    "ProtocolError",
    "decode_canonical_heartbeat",
    "decode_from_guest",
    "decode_from_host",
    "default_address",
    "encode",
    "encode_frame",
    "group_of",
]
