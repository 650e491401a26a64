"""Merge per-node rank tables into the table of the whole cluster, as mindformers'
``tools/merge_hccl.py`` does.

    python hccl/merge_hccl.py hccl_8p_01234567_10.0.0.1.json hccl_8p_01234567_10.0.0.2.json
    -> ./hccl_2s_16p.json

Servers are taken in the order of the files (and of each file's ``server_list``); rank ids are
renumbered 0..n-1 in that order; ``server_count`` is the sum. Every input is checked first
(:func:`hccl.validate.check_table`), and a server id or device IP that two inputs share is an error.
"""
from __future__ import annotations

import argparse
import copy
import sys
from typing import Dict, List, Optional, Sequence

from hccl.rank_table import RankTableError, load_table, new_device, new_server, new_table, write_table
from hccl.validate import check_table
from glm_common.cli import one_line_errors

__all__ = ["merge_tables", "merge_files", "merged_file_name", "main"]


def merge_tables(tables: Sequence[dict], sources: Optional[Sequence[str]] = None) -> dict:
    """One table from ``tables`` (each already valid); ``sources`` name them in error messages.
    Raises :class:`RankTableError` listing every server id or device IP used twice."""
    sources = list(sources) if sources is not None else [f"table {i}" for i in range(len(tables))]
    if not tables:
        raise RankTableError("merge: no rank tables given")
    errors: List[str] = []
    server_ids: Dict[str, str] = {}
    device_ips: Dict[str, str] = {}
    servers = []
    rank = 0
    for table, src in zip(tables, sources):
        for si, server in enumerate(table["server_list"]):
            sp = f"server_list[{si}]"
            sid = server["server_id"]
            if sid in server_ids:
                errors.append(f"{src}: {sp}.server_id: {sid!r} is already in {server_ids[sid]}")
            else:
                server_ids[sid] = f"{src}: {sp}.server_id"
            devices = []
            for di, device in enumerate(server["device"]):
                ip = device["device_ip"]
                if ip in device_ips:
                    errors.append(f"{src}: {sp}.device[{di}].device_ip: {ip!r} is already in {device_ips[ip]}")
                else:
                    device_ips[ip] = f"{src}: {sp}.device[{di}].device_ip"
                devices.append(new_device(device["device_id"], ip, rank))
                rank += 1
            merged = new_server(sid, devices)
            # keep what the input had besides the three known keys (host_nic_ip, anything extra)
            for key, value in server.items():
                if key not in ("server_id", "device"):
                    merged[key] = copy.deepcopy(value)
            servers.append(merged)
    if errors:
        raise RankTableError(errors)
    return new_table(servers)


def merged_file_name(table: dict) -> str:
    """mindformers' name: ``hccl_{servers}s_{ranks}p.json``, e.g. ``hccl_2s_16p.json``."""
    n = sum(len(s["device"]) for s in table["server_list"])
    return f"hccl_{table['server_count']}s_{n}p.json"


def merge_files(paths: Sequence[str], output: Optional[str] = None) -> str:
    """Check and merge the rank tables ``paths``; write the result to ``output`` (default
    ``./hccl_{S}s_{P}p.json``) and return its path. Nothing is written when an input is bad."""
    tables, errors = [], []
    for path in paths:
        try:
            table = load_table(path)
        except RankTableError as e:
            errors.extend(e.errors)
            continue
        problems = check_table(table, str(path))
        errors.extend(problems)
        tables.append(table)
    if errors:
        raise RankTableError(errors)
    merged = merge_tables(tables, [str(p) for p in paths])
    output = output or merged_file_name(merged)
    problems = check_table(merged, str(output))
    if problems:  # cannot happen for valid, disjoint inputs; never write a table that fails the check
        raise RankTableError(problems)
    return write_table(merged, output)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="merge_hccl.py",
        description="Merge the rank tables of single nodes (hccl_tools.py output) into one table of the "
                    "cluster: servers in the order given, rank ids renumbered 0..n-1 in that order, "
                    "server_count summed.",
        epilog="exit status: 0 written; 1 a bad input or a server id / device IP in two inputs "
               "(one line per problem, nothing written); 2 bad command line.")
    p.add_argument("tables", nargs="+", metavar="TABLE.json", help="per-node rank tables, in rank order")
    p.add_argument("--output", "-o", default=None,
                   help="output file (default: ./hccl_{servers}s_{ranks}p.json)")
    return p


@one_line_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        path = merge_files(args.tables, args.output)
    except RankTableError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        return 1
    table = load_table(path)
    n = sum(len(s["device"]) for s in table["server_list"])
    print(f"wrote {path}: {table['server_count']} servers, {n} ranks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
