"""TensorBoard event files without the tensorboard package: scalars only, written as TFRecord-framed
`Event` protocol buffers (the format `tensorboard --logdir RUN` reads).

Each record: uint64 length, masked CRC-32C of the length, the serialized Event, masked CRC-32C of it.
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

_CRC_TABLE: list[int] = []


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord framing uses."""
    if not _CRC_TABLE:
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
            _CRC_TABLE.append(c)
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(step: int, wall_time: float, summary: bytes | None = None, file_version: str | None = None) -> bytes:
    data = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3) + _varint(step)
    if file_version is not None:
        data += _field_bytes(3, file_version.encode())
    if summary is not None:
        data += _field_bytes(5, summary)
    return data


def _scalar_summary(values: dict[str, float]) -> bytes:
    parts = b""
    for tag, value in values.items():
        body = _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", float(value))
        parts += _field_bytes(1, body)
    return parts


class EventWriter:
    """Append scalar summaries to one events file in `logdir`."""

    def __init__(self, logdir: str | Path):
        self.path = Path(logdir) / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.loraq"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write(_event(0, time.time(), file_version="brain.Event:2"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._write(_event(step, time.time(), summary=_scalar_summary(values)))

    def _write(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        record = header + struct.pack("<I", _masked(crc32c(header))) + data + struct.pack("<I", _masked(crc32c(data)))
        with open(self.path, "ab") as f:
            f.write(record)
