"""Write the HCCL rank table of this node, as mindformers' ``tools/hccl_tools.py`` does.

    python hccl/hccl_tools.py --device_num "[0,8)"
    -> ./hccl_8p_01234567_10.0.0.1.json

Device IPs come from ``hccn_tool -i N -ip -g`` (its ``ipaddr:x.x.x.x`` line) when ``hccn_tool`` is on
PATH, else (or when it fails) from the ``address_N=x.x.x.x`` lines of ``/etc/hccn.conf``. The server
IP is ``--server_ip`` or this host's address. See :data:`RULES` (also in ``--help``) for the device
ranges accepted.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from hccl.rank_table import (RankTableError, is_ipv4, new_device, new_server, new_table,
                             parse_device_range, write_table)
from glm_common.cli import one_line_errors

__all__ = ["RULES", "check_device_range", "parse_visible_devices", "read_hccn_conf", "query_hccn_tool",
           "find_device_ips", "host_ip", "build_table", "table_file_name", "make_rank_table", "main"]

HCCN_CONF = "/etc/hccn.conf"
HCCN_TOOL = "hccn_tool"
GROUP_SIZE = 4  # on Ascend 910 devices 0-3 and 4-7 form two groups

RULES = """\
device ranges accepted (--device_num "[a,b)"; "[a,b]" reads the same, b excluded):
  1. a and b are integers with 0 <= a < b <= --device_num_per_node (default 8).
  2. The devices of a range must lie in one group of four, 0-3 or 4-7 (Ascend 910: the first four
     devices form one group and the last four another), unless the range is the whole node:
     a range with a < 4 < b is accepted only as [0,8) (or [0,16) with --device_num_per_node 16).
     So [0,1) [0,2) [2,4) [0,4) [4,6) [4,8) [0,8) are fine; [3,5) [2,6) [0,6) [1,8) are not.
  3. a..b-1 are logical ids: device a is the a-th entry of --visible_devices, which must
     therefore list at least b devices. The table's device_id is that entry (the physical id),
     and its IP is looked up under that id."""


def check_device_range(device_num: str, device_num_per_node: int = 8) -> Tuple[int, int]:
    """Parse ``--device_num`` and apply rules 1 and 2 of :data:`RULES`; return ``(a, b)``."""
    if device_num_per_node < 1:
        raise RankTableError(f"--device_num_per_node: {device_num_per_node} must be at least 1")
    start, end = parse_device_range(device_num, "--device_num")
    if end > device_num_per_node:
        raise RankTableError(f"--device_num: {device_num!r} must lie within [0,{device_num_per_node}) "
                             f"(--device_num_per_node {device_num_per_node})")
    if start < GROUP_SIZE < end and not (start == 0 and end in (8, 16)):
        raise RankTableError(f"--device_num: {device_num!r} crosses the device groups 0-3 and 4-7; a range must "
                             f"lie in one group ([a,b) with b <= 4 or a >= 4) or be the whole node [0,8)")
    return start, end


def parse_visible_devices(text: Optional[str], device_num_per_node: int = 8) -> List[int]:
    """``"0,1,2,3"`` -> ``[0, 1, 2, 3]``; None -> ``0..device_num_per_node-1``."""
    if text is None:
        return list(range(device_num_per_node))
    ids: List[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not re.fullmatch(r"[0-9]+", part):
            raise RankTableError(f"--visible_devices: {text!r}: {part!r} is not a device id "
                                 f"(expected a comma-separated list like \"0,1,2,3\")")
        if int(part) in ids:
            raise RankTableError(f"--visible_devices: {text!r}: device {int(part)} is listed twice")
        ids.append(int(part))
    return ids


def read_hccn_conf(path: str = HCCN_CONF) -> Dict[int, str]:
    """``{device_id: ip}`` from the ``address_N=IP`` lines of an hccn.conf (other lines ignored).
    A malformed address line, a bad IP or a repeated device raises naming ``path:line``."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise RankTableError(f"{path}: cannot read: {e.strerror or e}") from None
    ips: Dict[int, str] = {}
    where: Dict[int, int] = {}
    for no, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line.startswith("address_"):
            continue
        m = re.fullmatch(r"address_([0-9]+)\s*=\s*(\S*)", line)
        if not m:
            raise RankTableError(f"{path}:{no}: {line!r} is not of the form address_N=IP")
        device, ip = int(m.group(1)), m.group(2)
        if not is_ipv4(ip):
            raise RankTableError(f"{path}:{no}: address_{device}: {ip!r} is not an IPv4 address")
        if device in ips:
            raise RankTableError(f"{path}:{no}: address_{device} repeats line {where[device]}")
        ips[device], where[device] = ip, no
    return ips


def query_hccn_tool(device_id: int, tool: str = HCCN_TOOL, timeout: float = 30.0) -> str:
    """The IP ``hccn_tool -i N -ip -g`` reports for device ``N`` (its ``ipaddr:`` line)."""
    cmd = [tool, "-i", str(device_id), "-ip", "-g"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RankTableError(f"{' '.join(cmd)}: {e}") from None
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()
        raise RankTableError(f"{' '.join(cmd)}: exit status {res.returncode}"
                             + (f": {tail[-1]}" if tail else ""))
    for line in res.stdout.splitlines():
        key, _, value = line.strip().partition(":")
        if key.strip() == "ipaddr":
            ip = value.strip()
            if not is_ipv4(ip):
                raise RankTableError(f"{' '.join(cmd)}: ipaddr {ip!r} is not an IPv4 address")
            return ip
    raise RankTableError(f"{' '.join(cmd)}: no 'ipaddr:' line in its output")


def _check_unique(ips: Dict[int, str], source: str) -> None:
    seen: Dict[str, int] = {}
    for device, ip in ips.items():
        if ip in seen:
            raise RankTableError(f"{source}: devices {seen[ip]} and {device} have the same IP {ip}")
        seen[ip] = device


def find_device_ips(device_ids: Sequence[int], hccn_conf: str = HCCN_CONF,
                    tool: str = HCCN_TOOL) -> Tuple[Dict[int, str], str]:
    """``({device_id: ip}, source)`` for the physical ``device_ids``: from ``tool`` when it is on PATH
    and answers for every device, else from ``hccn_conf``; ``source`` says which was used."""
    tool_error = None
    if shutil.which(tool):
        try:
            ips = {d: query_hccn_tool(d, tool) for d in device_ids}
            _check_unique(ips, tool)
            return ips, tool
        except RankTableError as e:
            tool_error = str(e)
            if not os.path.exists(hccn_conf):
                raise RankTableError(f"{tool_error}; and {hccn_conf} does not exist") from None
            print(f"{tool_error}; reading {hccn_conf} instead", file=sys.stderr)
    try:
        conf = read_hccn_conf(hccn_conf)
    except RankTableError as e:
        if tool_error is None and not os.path.exists(hccn_conf):
            raise RankTableError(f"{e} (and {tool} is not on PATH)") from None
        raise
    missing = [d for d in device_ids if d not in conf]
    if missing:
        have = ",".join(map(str, sorted(conf))) or "none"
        raise RankTableError(f"{hccn_conf}: no address_N line for device{'s' if len(missing) > 1 else ''} "
                             f"{','.join(map(str, missing))} (devices listed: {have})")
    ips = {d: conf[d] for d in device_ids}
    _check_unique(ips, hccn_conf)
    return ips, hccn_conf


def host_ip() -> Optional[str]:
    """This host's IPv4 address: the source address of the default route (a UDP ``connect``, which
    sends nothing), else what the host name resolves to; None when neither works."""
    ip = None
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("10.254.254.254", 1))
        ip = s.getsockname()[0]
    except OSError:
        ip = None
    finally:
        s.close()
    if not is_ipv4(ip) or ip == "0.0.0.0":
        try:
            ip = socket.gethostbyname(socket.gethostname())
        except OSError:
            ip = None
    return ip if is_ipv4(ip) else None


def build_table(server_ip: str, devices: Sequence[Tuple[int, str]]) -> dict:
    """The one-server table: ``devices`` is ``[(device_id, device_ip), ...]`` in rank order."""
    return new_table([new_server(server_ip, [new_device(d, ip, r) for r, (d, ip) in enumerate(devices)])])


def table_file_name(logical_ids: Sequence[int], server_ip: str) -> str:
    """mindformers' name: ``hccl_{n}p_{ids}_{ip}.json``, e.g. ``hccl_8p_01234567_10.0.0.1.json``."""
    return f"hccl_{len(logical_ids)}p_{''.join(map(str, logical_ids))}_{server_ip}.json"


def make_rank_table(device_num: str = "[0,8)", visible_devices: Optional[str] = None,
                    server_ip: Optional[str] = None, device_num_per_node: int = 8,
                    hccn_conf: str = HCCN_CONF, output: str = ".", tool: str = HCCN_TOOL,
                    verbose: bool = False) -> str:
    """Check the arguments (:data:`RULES`), find the device IPs, write the table into the directory
    ``output`` and return its path. Raises :class:`RankTableError` (nothing written) on bad input."""
    start, end = check_device_range(device_num, device_num_per_node)
    visible = parse_visible_devices(visible_devices, device_num_per_node)
    if len(visible) < end:
        raise RankTableError(f"--visible_devices: {len(visible)} device{'s' if len(visible) != 1 else ''} "
                             f"listed ({','.join(map(str, visible))}), but --device_num {device_num!r} uses "
                             f"logical devices up to {end - 1}")
    if server_ip:
        if not is_ipv4(server_ip):
            raise RankTableError(f"--server_ip: {server_ip!r} is not an IPv4 address")
    else:
        server_ip = host_ip()
        if server_ip is None:
            raise RankTableError("--server_ip: cannot find this host's IP address; pass --server_ip")
        if server_ip.startswith("127."):
            print(f"note: server_ip {server_ip} is a loopback address; pass --server_ip for a multi-node table",
                  file=sys.stderr)
    logical = list(range(start, end))
    physical = [visible[i] for i in logical]
    ips, source = find_device_ips(physical, hccn_conf, tool)
    table = build_table(server_ip, [(d, ips[d]) for d in physical])
    if verbose:
        for dev in table["server_list"][0]["device"]:
            print(f"rank_id:{dev['rank_id']}, device_id:{dev['device_id']}, device_ip:{dev['device_ip']}")
    path = write_table(table, os.path.join(output, table_file_name(logical, server_ip)))
    if verbose:
        print(f"wrote {path}: {len(physical)} device{'s' if len(physical) != 1 else ''} on server {server_ip} "
              f"(device IPs from {source})")
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hccl_tools.py",
        description="Write this node's HCCL rank table (version 1.0) as hccl_{n}p_{ids}_{server_ip}.json. "
                    "Device IPs come from `hccn_tool -i N -ip -g` when hccn_tool is on PATH, else from the "
                    "address_N=IP lines of --hccn_conf. Merge the tables of several nodes with merge_hccl.py.",
        epilog=RULES + "\n\nexit status: 0 written; 1 bad arguments or device IPs not found (nothing written); "
                       "2 bad command line.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device_num", default="[0,8)",
                   help="range of logical devices, \"[a,b)\" (default \"[0,8)\"); see the rules below")
    p.add_argument("--visible_devices", default=None,
                   help="physical ids of the logical devices 0,1,..., e.g. \"4,5,6,7\" in a container that sees "
                        "the last four chips (default: 0..device_num_per_node-1)")
    p.add_argument("--server_ip", default=None, help="this node's IPv4 address (default: detected)")
    p.add_argument("--device_num_per_node", type=int, default=8, help="devices per node (default 8)")
    p.add_argument("--hccn_conf", default=HCCN_CONF, help=f"hccn.conf to read (default {HCCN_CONF})")
    p.add_argument("--output", default=".", help="directory to write the table into (default: current directory)")
    return p


@one_line_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        make_rank_table(args.device_num, args.visible_devices, args.server_ip, args.device_num_per_node,
                        args.hccn_conf, args.output, verbose=True)
    except RankTableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
