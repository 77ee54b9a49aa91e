"""Scalar logging: a JSON-lines file and a TensorBoard event file, with no dependency beyond the standard library.

TensorBoard reads ``events.out.tfevents.*`` files: a sequence of records (length, masked CRC-32C of the
length, an ``Event`` protocol buffer, masked CRC-32C of the data). Only the two message types needed for
scalars are encoded here (Event{wall_time, step, file_version | summary}, Summary.Value{tag, simple_value}).
"""
from __future__ import annotations

import json
import os
import socket
import struct
import time
from pathlib import Path


def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, wire: int, payload: bytes) -> bytes:
    return _varint((num << 3) | wire) + payload


def _bytes_field(num: int, data: bytes) -> bytes:
    return _field(num, 2, _varint(len(data)) + data)


def encode_event(wall_time: float, step: int, *, file_version: str | None = None,
                 scalars: dict[str, float] | None = None) -> bytes:
    msg = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        msg += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", float(v))))
            for tag, v in scalars.items()
        )
        msg += _bytes_field(5, values)
    return msg


def frame_record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc(header)) + data + struct.pack("<I", masked_crc(data))


def read_records(path: str | Path) -> list[bytes]:
    """Read back the records of an event file, checking both CRCs (used by the tests)."""
    raw = Path(path).read_bytes()
    out, pos = [], 0
    while pos < len(raw):
        header = raw[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (hcrc,) = struct.unpack("<I", raw[pos + 8:pos + 12])
        data = raw[pos + 12:pos + 12 + length]
        (dcrc,) = struct.unpack("<I", raw[pos + 12 + length:pos + 16 + length])
        if hcrc != masked_crc(header) or dcrc != masked_crc(data):
            raise ValueError(f"corrupted record at byte {pos} of {path}")
        out.append(data)
        pos += 16 + length
    return out


class ScalarWriter:
    """Append scalars to ``metrics.jsonl`` and a TensorBoard event file in `log_dir`."""

    def __init__(self, log_dir: str | Path, tensorboard: bool = True):
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.dir / "metrics.jsonl", "a")
        self.tb = None
        if tensorboard:
            name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
            self.tb = open(self.dir / name, "ab")
            self.tb.write(frame_record(encode_event(time.time(), 0, file_version="brain.Event:2")))

    def add_scalars(self, step: int, scalars: dict[str, float]) -> None:
        now = time.time()
        self.jsonl.write(json.dumps({"step": step, "time": now, **scalars}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            self.tb.write(frame_record(encode_event(now, step, scalars=scalars)))
            self.tb.flush()

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(log_dir: str | Path) -> list[dict]:
    """The records of ``metrics.jsonl`` (none if the folder or file is missing). A line that is not a JSON record
    with a step, such as the partial last line of a process killed while writing it, is skipped."""
    p = Path(log_dir) / "metrics.jsonl"
    if not p.exists():
        return []
    out = []
    for line in p.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            out.append(record)
    return out


def rewrite_metrics(log_dir: str | Path, records: list[dict]) -> None:
    """Replace ``metrics.jsonl`` by `records` atomically (a temporary file renamed over it), creating the folder."""
    d = Path(log_dir)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(m) + "\n" for m in records))
    os.replace(tmp, d / "metrics.jsonl")
