"""Pieces shared by the rank-table tools: the device-range syntax, IPv4 checks, JSON in and out.

A rank table (HCCL "version 1.0") is the JSON file mindformers' ``hccl_tools.py`` writes::

    {"version": "1.0",
     "server_count": "1",
     "server_list": [{"server_id": "10.0.0.1",
                      "device": [{"device_id": "0", "device_ip": "192.1.27.6", "rank_id": "0"}, ...],
                      "host_nic_ip": "reserve"}],
     "status": "completed"}

Every number in it is a string; the key order above is the order written.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, List, Tuple

from glm_common.fsutil import OutputError, atomic_file

__all__ = ["RankTableError", "parse_device_range", "is_ipv4", "load_table", "write_table",
           "new_table", "new_server", "new_device", "TABLE_VERSION", "TABLE_STATUS"]

TABLE_VERSION = "1.0"
TABLE_STATUS = "completed"

# "[a,b)" or "[a,b]": the launcher's syntax (the seed README writes '[0,8]' for eight devices 0..7),
# so either closing bracket means "b excluded".
_RANGE_RE = re.compile(r"\[\s*([0-9]+)\s*,\s*([0-9]+)\s*[\])]")
_IPV4_RE = re.compile(r"([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})")


class RankTableError(ValueError):
    """Input that cannot make or pass a rank table. ``errors`` holds one line per problem, each
    naming the file (or the option) and the JSON path / line; ``str()`` joins them with newlines."""

    def __init__(self, errors):
        if isinstance(errors, str):
            errors = [errors]
        self.errors: List[str] = list(errors)
        super().__init__("\n".join(self.errors))


def parse_device_range(text: str, what: str = "device range") -> Tuple[int, int]:
    """``"[0,8)"`` (or ``"[0,8]"``) -> ``(0, 8)``: start included, end excluded, start < end."""
    m = _RANGE_RE.fullmatch(str(text).strip())
    if not m:
        raise RankTableError(f"{what}: {text!r} is not a range like \"[0,8)\" (start included, end excluded)")
    start, end = int(m.group(1)), int(m.group(2))
    if start >= end:
        raise RankTableError(f"{what}: {text!r} is empty: the start {start} must be less than the end {end}")
    return start, end


def is_ipv4(value: Any) -> bool:
    """True for a dotted-quad string ``a.b.c.d`` with every part in 0..255 and no leading zeros."""
    if not isinstance(value, str):
        return False
    m = _IPV4_RE.fullmatch(value)
    if not m:
        return False
    return all(int(p) <= 255 and (p == "0" or not p.startswith("0")) for p in m.groups())


def load_table(path: str) -> Any:
    """Read ``path`` as JSON; a missing file or bad JSON raises :class:`RankTableError` naming the
    file (and the line and column of a syntax error)."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise RankTableError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise RankTableError(f"{path}: not UTF-8 text: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RankTableError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None


def write_table(table: dict, path: str) -> str:
    """Write ``table`` to ``path`` as mindformers does (``json.dump(..., indent=4)``), through
    :func:`glm_common.fsutil.atomic_file`: a failure leaves nothing behind and is a
    :class:`RankTableError` naming ``path`` (an unwritable folder, a full disk ...)."""
    path = os.path.abspath(path)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_file(path, "w", encoding="utf-8") as f:
            json.dump(table, f, indent=4)
            f.flush()
            os.fsync(f.fileno())
    except OutputError as e:
        raise RankTableError(str(e)) from None
    except OSError as e:
        raise RankTableError(f"{path}: cannot write: {e.strerror or e}") from None
    return path


def new_device(device_id, device_ip: str, rank_id) -> dict:
    """One ``device`` entry, keys in mindformers' order, numbers as strings."""
    return {"device_id": str(device_id), "device_ip": str(device_ip), "rank_id": str(rank_id)}


def new_server(server_id: str, devices: list) -> dict:
    """One ``server_list`` entry, keys in mindformers' order."""
    return {"server_id": str(server_id), "device": list(devices), "host_nic_ip": "reserve"}


def new_table(servers: list) -> dict:
    """The whole table, keys in mindformers' order."""
    return {"version": TABLE_VERSION, "server_count": str(len(servers)),
            "server_list": list(servers), "status": TABLE_STATUS}
