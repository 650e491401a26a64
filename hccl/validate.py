"""Check a rank table before anything is started on it.

Usable from Python (:func:`check_table`, :func:`check_file`, :func:`validate_file`,
:func:`rank_plan`) and from the shell::

    python hccl/validate.py hccl_8p_01234567_10.0.0.1.json --device-range "[0,8)"
    python -m hccl.validate cluster.json --device-range "[8,16)" --rank-size 16 --plan

What is checked, each problem reported as one line ``FILE: JSON.PATH: what is wrong``:

- the shape of a version 1.0 table: ``version`` "1.0", ``status`` "completed", ``server_count`` equal
  to the number of servers, each server with an IPv4 ``server_id`` and a non-empty ``device`` list,
  each device with ``device_id``, ``device_ip``, ``rank_id``; every number written as a string;
- rank ids unique and exactly ``0..n-1`` for the table's ``n`` devices;
- device IPs well-formed IPv4 and unique over the whole table; server ids unique; device ids unique
  within a server;
- the launch arguments against the table, with ``run_distribute.sh``'s meaning of them:
  without ``RANK_SIZE`` (one node) the device range ``[a,b)`` starts ranks ``0..b-a-1`` on devices
  ``a..b-1``, so the table must have one server and ``b-a`` devices; with ``RANK_SIZE`` (several nodes)
  the range is the ranks this node starts (on devices ``0..b-a-1``), so ``RANK_SIZE`` must equal the
  table's device count, ``b <= RANK_SIZE``, and those ranks must all be on one server;
- the devices against the launch and the node: one node's table must name exactly the devices of the
  range (``[0,2)`` with a table of devices 2 and 3 is refused: the ranks would bind devices the table does
  not name), and every ``device_id`` must exist on a node: below the node's device count (``--device-count``;
  default: the ``/dev/davinciN`` devices of this host, else 8, ``hccl_tools.py``'s ``--device_num_per_node``).

The launcher gives each rank the ``DEVICE_ID`` its table entry names (:func:`rank_plan` with the table).

Exit status of the command: 0 valid, 1 invalid table or arguments (one line per problem on stderr),
2 bad command line.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from hccl.rank_table import (TABLE_STATUS, TABLE_VERSION, RankTableError, is_ipv4, load_table,
                             parse_device_range)
from glm_common.cli import one_line_errors

__all__ = ["check_table", "check_file", "validate_file", "rank_plan", "table_devices", "node_device_count",
           "table_summary", "main", "DEFAULT_DEVICE_COUNT"]

#: devices of a node when this host shows none (``hccl_tools.py --device_num_per_node``'s default)
DEFAULT_DEVICE_COUNT = 8

_NUMBER_RE = re.compile(r"^(0|[1-9][0-9]*)$")

RangeArg = Union[None, str, Tuple[int, int]]


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _number(value: Any, path: str, errors: List[str], src: str) -> Optional[int]:
    """A count or id: a string of decimal digits. Appends an error and returns None otherwise."""
    if isinstance(value, str) and _NUMBER_RE.fullmatch(value):
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        errors.append(f"{src}: {path}: expected a number written as a string like \"{value}\", got {value}")
    elif isinstance(value, (str, int)) and not isinstance(value, bool):
        errors.append(f"{src}: {path}: {value!r} is not a non-negative integer")
    else:
        errors.append(f"{src}: {path}: expected a number written as a string, got {_kind(value)}")
    return None


def _range(device_range: RangeArg) -> Optional[Tuple[int, int]]:
    if device_range is None:
        return None
    if isinstance(device_range, str):
        return parse_device_range(device_range)
    start, end = (int(x) for x in device_range)
    if not 0 <= start < end:
        raise RankTableError(f"device range: [{start},{end}) is empty or negative")
    return start, end


def _fmt_range(r: Tuple[int, int]) -> str:
    return f"[{r[0]},{r[1]})"


def node_device_count(dev: str = "/dev") -> Optional[int]:
    """The Ascend devices of this host (``/dev/davinciN``, the driver's device files), None where it has none."""
    ids = [int(m.group(1)) for f in glob.glob(os.path.join(dev, "davinci*"))
           if (m := re.fullmatch(r"davinci(\d+)", os.path.basename(f)))]
    return max(ids) + 1 if ids else None


def _ids(nums: Sequence[int]) -> str:
    nums = sorted(nums)
    if nums and nums == list(range(nums[0], nums[-1] + 1)) and len(nums) > 2:
        return f"{nums[0]}..{nums[-1]}"
    return ", ".join(map(str, nums))


def check_table(table: Any, source: str = "rank table", device_range: RangeArg = None,
                rank_size: Optional[int] = None, device_count: Optional[int] = None) -> List[str]:
    """All problems of an already-parsed table, one line each (empty list: valid).

    ``source`` names the file in the messages; ``device_range`` (``"[a,b)"`` or ``(a, b)``) and
    ``rank_size`` are the launcher's ``DEVICE_RANGE`` and ``RANK_SIZE`` (see the module docstring);
    ``device_count`` the devices of a node (None: :func:`node_device_count`, else
    :data:`DEFAULT_DEVICE_COUNT`). A malformed ``device_range`` or ``rank_size`` is reported as a problem too.
    """
    if device_count is None:
        device_count = node_device_count() or DEFAULT_DEVICE_COUNT
    src = source
    errors: List[str] = []
    if not isinstance(table, dict):
        return [f"{src}: (top level): expected an object, got {_kind(table)}"]

    for key in ("version", "server_count", "server_list", "status"):
        if key not in table:
            errors.append(f"{src}: {key}: missing")
    if "version" in table and table["version"] != TABLE_VERSION:
        errors.append(f"{src}: version: expected \"{TABLE_VERSION}\", got {table['version']!r}")
    if "status" in table and table["status"] != TABLE_STATUS:
        errors.append(f"{src}: status: expected \"{TABLE_STATUS}\", got {table['status']!r}")

    servers = table.get("server_list")
    if "server_list" in table and not isinstance(servers, list):
        errors.append(f"{src}: server_list: expected a list, got {_kind(servers)}")
        servers = None
    elif isinstance(servers, list) and not servers:
        errors.append(f"{src}: server_list: empty")
    servers = servers if isinstance(servers, list) else []

    if "server_count" in table:
        count = _number(table["server_count"], "server_count", errors, src)
        if count is not None and "server_list" in table and isinstance(table["server_list"], list) \
                and count != len(servers):
            errors.append(f"{src}: server_count: {count} does not match the {len(servers)} "
                          f"entr{'y' if len(servers) == 1 else 'ies'} of server_list")

    server_ids: Dict[str, str] = {}
    device_ips: Dict[str, str] = {}
    ranks: Dict[int, str] = {}
    rank_server: Dict[int, int] = {}  # rank -> index in server_list
    server_devices: Dict[int, List[int]] = {}  # index in server_list -> its device ids
    n_devices = 0
    shape_ok = True
    for si, server in enumerate(servers):
        sp = f"server_list[{si}]"
        if not isinstance(server, dict):
            errors.append(f"{src}: {sp}: expected an object, got {_kind(server)}")
            shape_ok = False
            continue
        for key in ("server_id", "device"):
            if key not in server:
                errors.append(f"{src}: {sp}.{key}: missing")
                shape_ok = False
        if "server_id" in server:
            sid = server["server_id"]
            if not is_ipv4(sid):
                errors.append(f"{src}: {sp}.server_id: {sid!r} is not an IPv4 address")
            elif sid in server_ids:
                errors.append(f"{src}: {sp}.server_id: {sid!r} repeats {server_ids[sid]}")
            else:
                server_ids[sid] = f"{sp}.server_id"
        if "host_nic_ip" in server and not isinstance(server["host_nic_ip"], str):
            errors.append(f"{src}: {sp}.host_nic_ip: expected a string, got {_kind(server['host_nic_ip'])}")
        devices = server.get("device")
        if "device" in server and not isinstance(devices, list):
            errors.append(f"{src}: {sp}.device: expected a list, got {_kind(devices)}")
            shape_ok = False
            continue
        if isinstance(devices, list) and not devices:
            errors.append(f"{src}: {sp}.device: empty")
        device_ids: Dict[int, str] = {}
        for di, device in enumerate(devices or []):
            dp = f"{sp}.device[{di}]"
            n_devices += 1
            if not isinstance(device, dict):
                errors.append(f"{src}: {dp}: expected an object, got {_kind(device)}")
                shape_ok = False
                continue
            for key in ("device_id", "device_ip", "rank_id"):
                if key not in device:
                    errors.append(f"{src}: {dp}.{key}: missing")
            if "device_id" in device:
                did = _number(device["device_id"], f"{dp}.device_id", errors, src)
                if did is not None:
                    if did in device_ids:
                        errors.append(f"{src}: {dp}.device_id: device {did} repeats {device_ids[did]}")
                    else:
                        device_ids[did] = f"{dp}.device_id"
                        server_devices.setdefault(si, []).append(did)
                    if did >= device_count:
                        errors.append(f"{src}: {dp}.device_id: device {did} does not exist on a node of "
                                      f"{device_count} devices (0..{device_count - 1})")
                        shape_ok = False
            if "device_ip" in device:
                ip = device["device_ip"]
                if not is_ipv4(ip):
                    errors.append(f"{src}: {dp}.device_ip: {ip!r} is not an IPv4 address")
                elif ip in device_ips:
                    errors.append(f"{src}: {dp}.device_ip: {ip!r} repeats {device_ips[ip]}")
                else:
                    device_ips[ip] = f"{dp}.device_ip"
            if "rank_id" in device:
                rid = _number(device["rank_id"], f"{dp}.rank_id", errors, src)
                if rid is None:
                    shape_ok = False
                elif rid in ranks:
                    errors.append(f"{src}: {dp}.rank_id: rank {rid} repeats {ranks[rid]}")
                    shape_ok = False
                else:
                    ranks[rid] = f"{dp}.rank_id"
                    rank_server[rid] = si
            else:
                shape_ok = False
    for rid in sorted(ranks):
        if rid >= n_devices:
            errors.append(f"{src}: {ranks[rid]}: rank {rid} is out of range: the table has {n_devices} "
                          f"device{'s' if n_devices != 1 else ''}, so rank ids run 0..{n_devices - 1}")
            shape_ok = False

    # The launch arguments against the table.
    try:
        rng = _range(device_range)
    except RankTableError as e:
        errors.append(f"{src}: {e}")
        rng = None
    if rank_size is not None:
        try:
            rank_size = int(rank_size)
            if rank_size < 1:
                raise ValueError
        except (TypeError, ValueError):
            errors.append(f"{src}: RANK_SIZE: {rank_size!r} is not a positive integer")
            rank_size = None
            rng = None  # the range cannot be read without knowing the mode
    if not servers or not shape_ok:
        return errors
    if rank_size is None and rng is not None:  # one node: ranks 0..b-a-1 on devices a..b-1
        start, end = rng
        if len(servers) > 1:
            errors.append(f"{src}: server_list: the table lists {len(servers)} servers, but a launch without "
                          f"RANK_SIZE starts one node; pass RANK_SIZE ({n_devices}) for a multi-node table")
        elif end - start != n_devices:
            errors.append(f"{src}: device range {_fmt_range(rng)} starts {end - start} rank"
                          f"{'s' if end - start != 1 else ''}, but the table lists {n_devices} device"
                          f"{'s' if n_devices != 1 else ''}")
        elif end > device_count:
            errors.append(f"{src}: device range {_fmt_range(rng)} names devices up to {end - 1}, but a node "
                          f"has {device_count} devices (0..{device_count - 1})")
        elif sorted(server_devices.get(0, [])) != list(range(start, end)):
            errors.append(f"{src}: server_list[0].device: the table names device"
                          f"{'s' if n_devices != 1 else ''} {_ids(server_devices.get(0, []))}, but device range "
                          f"{_fmt_range(rng)} is device{'s' if end - start != 1 else ''} {_ids(range(start, end))}: "
                          f"the ranks would bind devices the table does not name")
    elif rank_size is not None:
        if rank_size != n_devices:
            errors.append(f"{src}: RANK_SIZE {rank_size} does not match the table's {n_devices} device"
                          f"{'s' if n_devices != 1 else ''}")
        elif rng is not None:
            start, end = rng
            if end > rank_size:
                errors.append(f"{src}: device range {_fmt_range(rng)} names ranks up to {end - 1}, "
                              f"past RANK_SIZE {rank_size} (ranks 0..{rank_size - 1})")
            else:
                on = sorted({rank_server[r] for r in range(start, end)})
                if len(on) > 1:
                    names = ", ".join(f"server_list[{i}] ({servers[i].get('server_id')})" for i in on)
                    errors.append(f"{src}: device range {_fmt_range(rng)}: ranks {start}..{end - 1} are on "
                                  f"{len(on)} servers ({names}); one node's ranks must be on one server")
    return errors


def check_file(path: str, device_range: RangeArg = None, rank_size: Optional[int] = None,
               device_count: Optional[int] = None) -> List[str]:
    """:func:`check_table` on the JSON file ``path`` (unreadable or bad JSON: one error line)."""
    try:
        table = load_table(path)
    except RankTableError as e:
        return list(e.errors)
    return check_table(table, str(path), device_range, rank_size, device_count)


def validate_file(path: str, device_range: RangeArg = None, rank_size: Optional[int] = None,
                  device_count: Optional[int] = None) -> dict:
    """Load and check ``path``; return the table, or raise :class:`RankTableError` listing every problem."""
    table = load_table(path)
    errors = check_table(table, str(path), device_range, rank_size, device_count)
    if errors:
        raise RankTableError(errors)
    return table


def table_devices(table: dict) -> Dict[int, int]:
    """``{rank_id: device_id}`` of a valid table."""
    return {int(d["rank_id"]): int(d["device_id"]) for s in table["server_list"] for d in s["device"]}


def rank_plan(device_range: RangeArg, rank_size: Optional[int] = None,
              table: Optional[dict] = None) -> List[Tuple[int, int]]:
    """``(RANK_ID, DEVICE_ID)`` of each process one launch starts, in order, as ``run_distribute.sh``
    assigns them: one node (``rank_size`` None) starts ranks ``0..b-a-1``, several nodes the global ranks
    ``a..b-1``. Each rank's device is the one its entry of ``table`` (a checked rank table) names; without
    a table, one node runs rank ``i - a`` on device ``i`` for ``i`` in ``[a,b)``, several nodes rank ``i``
    on device ``i - a``."""
    start, end = _range(device_range)
    ranks = range(0, end - start) if rank_size is None else range(start, end)
    if table is not None:
        devices = table_devices(table)
        return [(r, devices[r]) for r in ranks]
    if rank_size is None:
        return [(i - start, i) for i in range(start, end)]
    return [(i, i - start) for i in range(start, end)]


def table_summary(table: dict) -> str:
    """``"2 servers, 16 ranks"`` for a valid table."""
    servers = table["server_list"]
    n = sum(len(s["device"]) for s in servers)
    return f"{len(servers)} server{'s' if len(servers) != 1 else ''}, {n} rank{'s' if n != 1 else ''}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="validate.py",
        description="Check an HCCL rank table (version 1.0, as hccl_tools.py writes it) and, optionally, "
                    "the launch arguments run_distribute.sh will use with it.",
        epilog="Exit status: 0 valid; 1 invalid (one line per problem on stderr: FILE: JSON.PATH: problem); "
               "2 bad command line.")
    p.add_argument("table", help="rank table JSON file")
    p.add_argument("--device-range", "--device_range", dest="device_range", metavar="RANGE",
                   help="DEVICE_RANGE as given to run_distribute.sh, \"[a,b)\" (\"[a,b]\" reads the same: b excluded). "
                        "Without --rank-size: one node, devices a..b-1, the table must have one server with b-a "
                        "devices. With --rank-size: the global ranks a..b-1 this node starts, all on one server.")
    p.add_argument("--rank-size", "--rank_size", dest="rank_size", type=int, metavar="N",
                   help="RANK_SIZE of a multi-node launch: must equal the table's device count")
    p.add_argument("--device-count", "--device_count", dest="device_count", type=int, metavar="N",
                   help=f"devices of a node: every device_id must be below it (default: the /dev/davinciN devices "
                        f"of this host, else {DEFAULT_DEVICE_COUNT})")
    p.add_argument("--plan", action="store_true",
                   help="after a successful check print one line \"RANK_ID DEVICE_ID\" per process the launch "
                        "starts (needs --device-range), its device from the table, instead of the summary")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing when valid")
    return p


@one_line_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.plan and args.device_range is None:
        p.error("--plan needs --device-range")
    if args.device_count is not None and args.device_count < 1:
        p.error(f"--device-count: {args.device_count} must be at least 1")
    errors = check_file(args.table, args.device_range, args.rank_size, args.device_count)
    if errors:
        for line in errors:
            print(line, file=sys.stderr)
        return 1
    if args.plan:
        for rank_id, device_id in rank_plan(args.device_range, args.rank_size, load_table(args.table)):
            print(rank_id, device_id)
    elif not args.quiet:
        print(f"{args.table}: ok: {table_summary(load_table(args.table))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
