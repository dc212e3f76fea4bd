"""Protobuf wire encoding shared by everything that writes Hubble messages as bytes without the protobuf
runtime (the simulator, the Hubble API server, the flow table -> Flow encoder): one varint encoder."""

from __future__ import annotations

_BYTE = [bytes((i,)) for i in range(256)]
_UINT64 = (1 << 64) - 1


def encode_varint(value: int) -> bytes:
    """The protobuf base-128 varint of `value` (a negative int64 as its 10-byte two's complement)."""
    # Unrolled for the sizes that matter (ports, lengths, nanoseconds, epoch seconds): the simulator's and the
    # server's hottest code path.
    if value < 0x80:
        if value >= 0:
            return _BYTE[value]
        value &= _UINT64
    elif value < 0x4000:
        return bytes((value & 0x7F | 0x80, value >> 7))
    elif value < 0x200000:
        return bytes((value & 0x7F | 0x80, value >> 7 & 0x7F | 0x80, value >> 14))
    elif value < 0x10000000:
        return bytes((value & 0x7F | 0x80, value >> 7 & 0x7F | 0x80, value >> 14 & 0x7F | 0x80, value >> 21))
    elif value < 0x800000000:  # nanoseconds and epoch seconds
        return bytes((
            value & 0x7F | 0x80, value >> 7 & 0x7F | 0x80, value >> 14 & 0x7F | 0x80, value >> 21 & 0x7F | 0x80,
            value >> 28,
        ))  # fmt: skip
    else:
        value &= _UINT64
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
