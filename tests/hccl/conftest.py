"""Fixtures of the rank-table tests: fake hccn.conf files and a fake ``hccn_tool`` on PATH."""
import json
import os
import stat
import subprocess
import sys

import pytest

from tests.conftest import ROOT

# The device IPs of the seed README's 8-device sample table.
SEED_IPS = ["192.1.27.6", "192.2.27.6", "192.3.27.6", "192.4.27.6",
            "192.1.27.7", "192.2.27.7", "192.3.27.7", "192.4.27.7"]
# A second node: same layout, other subnet.
NODE2_IPS = [ip.replace(".27.", ".28.") for ip in SEED_IPS]


def write_conf(path, ips, extra=""):
    """An hccn.conf as Ascend drivers write it: address_N, netmask_N, netdetect_N per device."""
    lines = []
    for i, ip in enumerate(ips):
        lines += [f"address_{i}={ip}", f"netmask_{i}=255.255.255.0", f"netdetect_{i}=192.168.{i}.1"]
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def write_fake_tool(bin_dir, ips, fail=()):
    """A ``hccn_tool`` script answering ``hccn_tool -i N -ip -g`` like the real one:
    ``ipaddr:IP`` then ``netmask:...``; devices in ``fail`` exit 1 with a message."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    cases = []
    for i, ip in enumerate(ips):
        if i in fail:
            cases.append(f'  {i}) echo "Get ip failed, device {i} is not ready" >&2; exit 1;;')
        else:
            cases.append(f'  {i}) echo "ipaddr:{ip}"; echo "netmask:255.255.255.0";;')
    script = "\n".join([
        "#!/bin/sh",
        'if [ "$1" != "-i" ] || [ "$3" != "-ip" ] || [ "$4" != "-g" ]; then echo "usage" >&2; exit 2; fi',
        'case "$2" in',
        *cases,
        '  *) echo "device $2 does not exist" >&2; exit 1;;',
        "esac",
        ""])
    tool = bin_dir / "hccn_tool"
    tool.write_text(script)
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return tool


@pytest.fixture
def bin_dir(tmp_path, monkeypatch):
    """An empty directory that is the whole PATH, so a real hccn_tool is never found; tests put a
    fake one in it."""
    d = tmp_path / "bin"
    d.mkdir()
    monkeypatch.setenv("PATH", str(d))
    return d


def run_cli(script, *args, cwd=None, env=None):
    """Run ``python hccl/<script> args...``; returns the CompletedProcess (text)."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, str(ROOT / "hccl" / script), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=full_env, timeout=60)


def seed_table(server_id="10.0.0.1", ips=SEED_IPS, rank0=0):
    """A valid one-server table written out by hand (the seed README's shape)."""
    return {"version": "1.0", "server_count": "1",
            "server_list": [{"server_id": server_id,
                             "device": [{"device_id": str(i), "device_ip": ip, "rank_id": str(rank0 + i)}
                                        for i, ip in enumerate(ips)],
                             "host_nic_ip": "reserve"}],
            "status": "completed"}


def dump(path, obj):
    path.write_text(json.dumps(obj, indent=4))
    return path
