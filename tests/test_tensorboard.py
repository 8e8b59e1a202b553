import struct

from loraq.product.tensorboard import EventWriter, crc32c


def _records(path):
    data = path.read_bytes()
    i = 0
    while i < len(data):
        (length,) = struct.unpack_from("<Q", data, i)
        yield data[i + 12 : i + 12 + length]
        i += 12 + length + 4


def test_crc32c_known_vector():
    assert crc32c(b"123456789") == 0xE3069283


def test_events_file_frames_and_encodes_scalars(tmp_path):
    writer = EventWriter(tmp_path)
    writer.scalars(3, {"train/loss": 1.5})
    records = list(_records(writer.path))
    assert len(records) == 2 and b"brain.Event:2" in records[0]
    event = records[1]
    assert event[0] == 0x09 and event[9] == 0x10 and event[10] == 3  # wall_time, then step 3
    assert b"train/loss" in event and struct.pack("<f", 1.5) in event
    raw = writer.path.read_bytes()
    (length,) = struct.unpack_from("<Q", raw, 0)
    (crc,) = struct.unpack_from("<I", raw, 8)
    masked = (((crc32c(raw[:8]) >> 15) | (crc32c(raw[:8]) << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    assert crc == masked
