"""Read back what wandb wrote offline: run-<id>.wandb is a LevelDB-style record log of protobuf
messages (wandb.proto.wandb_internal_pb2.Record), and wandb 0.31 ships no reader for it."""

from __future__ import annotations

import json
import struct
from pathlib import Path

_HEADER = 7  # ":W&B", a 2-byte magic and a 1-byte version
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb record log"
    pos, pending = _HEADER, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            payload = chunk
        elif kind == _FIRST:
            pending = chunk
            continue
        elif kind == _MIDDLE:
            pending += chunk
            continue
        else:
            payload, pending = pending + chunk, b""
        record = pb.Record()
        record.ParseFromString(payload)
        yield record


def history(path: Path) -> list[dict]:
    rows = []
    for record in records(path):
        if record.HasField("history"):
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return rows


def run_ids(path: Path) -> set[str]:
    return {record.run.run_id for record in records(path) if record.HasField("run")}


def config(path: Path) -> dict:
    out = {}
    for record in records(path):
        if record.HasField("config"):
            for item in record.config.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def summary(path: Path) -> dict:
    """The run summary as it stands at the end of the log (later updates win)."""
    out = {}
    for record in records(path):
        if record.HasField("summary"):
            for item in record.summary.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def history_keys(path: Path) -> set[str]:
    return {key for row in history(path) for key in row}
