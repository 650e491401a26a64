"""hccl/hccl_tools.py: the one-node rank table from hccn.conf or hccn_tool, mindformers' shape and rules."""
import json
import os

import pytest

from hccl import hccl_tools, rank_table
from hccl.hccl_tools import check_device_range, make_rank_table, read_hccn_conf
from hccl.rank_table import RankTableError
from hccl.validate import check_file
from tests.hccl.conftest import NODE2_IPS, SEED_IPS, run_cli, write_conf, write_fake_tool

# What mindformers' hccl_tools.py writes (json.dump(table, f, indent=4)) for devices [0,2) of the
# seed README's node, typed out in full: key order, strings for every number, no trailing newline.
EXPECTED_2P = """{
    "version": "1.0",
    "server_count": "1",
    "server_list": [
        {
            "server_id": "10.0.0.1",
            "device": [
                {
                    "device_id": "0",
                    "device_ip": "192.1.27.6",
                    "rank_id": "0"
                },
                {
                    "device_id": "1",
                    "device_ip": "192.2.27.6",
                    "rank_id": "1"
                }
            ],
            "host_nic_ip": "reserve"
        }
    ],
    "status": "completed"
}"""


@pytest.fixture
def conf(tmp_path):
    return write_conf(tmp_path / "hccn.conf", SEED_IPS)


def listing(directory):
    return sorted(p.name for p in directory.iterdir())


def test_single_node_from_hccn_conf_matches_mindformers_bytes(tmp_path, conf, bin_dir):
    out = tmp_path / "out"
    path = make_rank_table("[0,2)", server_ip="10.0.0.1", hccn_conf=str(conf), output=str(out))
    assert os.path.basename(path) == "hccl_2p_01_10.0.0.1.json"
    assert (out / "hccl_2p_01_10.0.0.1.json").read_text() == EXPECTED_2P
    assert listing(out) == ["hccl_2p_01_10.0.0.1.json"]  # no temp file left


def test_full_node_is_the_seed_readme_sample(tmp_path, conf, bin_dir):
    path = make_rank_table("[0,8)", server_ip="10.0.0.1", hccn_conf=str(conf), output=str(tmp_path))
    assert os.path.basename(path) == "hccl_8p_01234567_10.0.0.1.json"
    table = json.loads(open(path).read())
    assert list(table) == ["version", "server_count", "server_list", "status"]
    assert list(table["server_list"][0]) == ["server_id", "device", "host_nic_ip"]
    assert table["server_list"][0]["device"] == [
        {"device_id": str(i), "device_ip": SEED_IPS[i], "rank_id": str(i)} for i in range(8)]
    assert check_file(path, "[0,8)") == []


def test_second_group_renumbers_ranks_from_zero(tmp_path, conf, bin_dir):
    path = make_rank_table("[4,8)", server_ip="10.0.0.1", hccn_conf=str(conf), output=str(tmp_path))
    assert os.path.basename(path) == "hccl_4p_4567_10.0.0.1.json"
    devices = json.loads(open(path).read())["server_list"][0]["device"]
    assert devices == [{"device_id": str(4 + r), "device_ip": SEED_IPS[4 + r], "rank_id": str(r)}
                       for r in range(4)]


def test_visible_devices_map_logical_to_physical(tmp_path, conf, bin_dir):
    # A container that sees the last four chips: logical [0,4) are physical 4..7.
    path = make_rank_table("[0,4)", visible_devices="4,5,6,7", server_ip="10.0.0.1",
                           hccn_conf=str(conf), output=str(tmp_path))
    assert os.path.basename(path) == "hccl_4p_0123_10.0.0.1.json"
    devices = json.loads(open(path).read())["server_list"][0]["device"]
    assert [d["device_id"] for d in devices] == ["4", "5", "6", "7"]
    assert [d["device_ip"] for d in devices] == SEED_IPS[4:]


def test_closing_bracket_reads_as_excluded_end(tmp_path, conf, bin_dir):
    # The seed README passes '[0,8]' for eight devices 0..7.
    path = make_rank_table("[0,8]", server_ip="10.0.0.1", hccn_conf=str(conf), output=str(tmp_path))
    assert os.path.basename(path) == "hccl_8p_01234567_10.0.0.1.json"


@pytest.mark.parametrize("rng", ["[0,1)", "[3,4)", "[0,2)", "[2,4)", "[0,3)", "[1,3)", "[0,4)",
                                 "[4,5)", "[4,6)", "[6,8)", "[4,8)", "[0,8)", "[5,8)"])
def test_device_ranges_mindformers_accepts(rng):
    start, end = check_device_range(rng)
    assert (start, end) == tuple(int(x) for x in rng[1:-1].split(","))


@pytest.mark.parametrize("rng,per_node,message", [
    ("[3,5)", 8, "crosses the device groups 0-3 and 4-7"),
    ("[2,6)", 8, "crosses the device groups 0-3 and 4-7"),
    ("[0,6)", 8, "crosses the device groups 0-3 and 4-7"),
    ("[1,8)", 8, "crosses the device groups 0-3 and 4-7"),
    ("[0,9)", 8, "must lie within [0,8)"),
    ("[0,16)", 8, "must lie within [0,8)"),
    ("[2,10)", 16, "crosses the device groups 0-3 and 4-7"),
    ("[4,4)", 8, "is empty"),
    ("[5,3)", 8, "is empty"),
    ("0-8", 8, "is not a range like"),
    ("[a,8)", 8, "is not a range like"),
    ("(0,8)", 8, "is not a range like"),
    ("[0,8)", 0, "--device_num_per_node: 0 must be at least 1"),
])
def test_device_ranges_rejected(rng, per_node, message):
    with pytest.raises(RankTableError) as e:
        check_device_range(rng, per_node)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_sixteen_devices_per_node_allows_the_whole_node(tmp_path, bin_dir):
    ips = [f"10.9.{i}.1" for i in range(16)]
    conf = write_conf(tmp_path / "hccn16.conf", ips)
    path = make_rank_table("[0,16)", server_ip="10.0.0.1", device_num_per_node=16,
                           hccn_conf=str(conf), output=str(tmp_path))
    assert os.path.basename(path) == "hccl_16p_0123456789101112131415_10.0.0.1.json"
    assert len(json.loads(open(path).read())["server_list"][0]["device"]) == 16


@pytest.mark.parametrize("visible,message", [
    ("0,1", "--visible_devices: 2 devices listed (0,1), but --device_num '[0,4)' uses logical devices up to 3"),
    ("0,x,2,3", "--visible_devices: '0,x,2,3': 'x' is not a device id "
                '(expected a comma-separated list like "0,1,2,3")'),
    ("0,1,1,3", "--visible_devices: '0,1,1,3': device 1 is listed twice"),
])
def test_bad_visible_devices(tmp_path, conf, bin_dir, visible, message):
    with pytest.raises(RankTableError) as e:
        make_rank_table("[0,4)", visible_devices=visible, server_ip="10.0.0.1",
                        hccn_conf=str(conf), output=str(tmp_path / "out"))
    assert str(e.value) == message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra,message", [
    ("address_8\n", ":25: 'address_8' is not of the form address_N=IP"),
    ("address_8=10.0.0.300\n", ":25: address_8: '10.0.0.300' is not an IPv4 address"),
    ("address_3=10.1.1.1\n", ":25: address_3 repeats line 10"),
])
def test_hccn_conf_errors_name_file_and_line(tmp_path, bin_dir, extra, message):
    conf = write_conf(tmp_path / "hccn.conf", SEED_IPS, extra=extra)
    with pytest.raises(RankTableError) as e:
        read_hccn_conf(str(conf))
    assert str(e.value) == f"{conf}{message}"


def test_hccn_conf_missing_device(tmp_path, bin_dir):
    conf = write_conf(tmp_path / "hccn.conf", SEED_IPS[:4])
    with pytest.raises(RankTableError) as e:
        make_rank_table("[0,8)", server_ip="10.0.0.1", hccn_conf=str(conf), output=str(tmp_path / "out"))
    assert str(e.value) == f"{conf}: no address_N line for devices 4,5,6,7 (devices listed: 0,1,2,3)"
    assert not (tmp_path / "out").exists()


def test_hccn_conf_duplicate_ip(tmp_path, bin_dir):
    conf = write_conf(tmp_path / "hccn.conf", SEED_IPS[:3] + [SEED_IPS[0]] + SEED_IPS[4:])
    with pytest.raises(RankTableError) as e:
        make_rank_table("[0,4)", server_ip="10.0.0.1", hccn_conf=str(conf), output=str(tmp_path))
    assert str(e.value) == f"{conf}: devices 0 and 3 have the same IP {SEED_IPS[0]}"


def test_no_tool_and_no_conf(tmp_path, bin_dir):
    missing = tmp_path / "nope.conf"
    with pytest.raises(RankTableError) as e:
        make_rank_table("[0,8)", server_ip="10.0.0.1", hccn_conf=str(missing), output=str(tmp_path))
    assert str(e.value) == f"{missing}: cannot read: No such file or directory (and hccn_tool is not on PATH)"


def test_device_ips_from_fake_hccn_tool_on_path(tmp_path, conf, bin_dir):
    # The tool answers with the second node's IPs, the conf holds the first node's: the tool wins.
    write_fake_tool(bin_dir, NODE2_IPS)
    path = make_rank_table("[0,8)", server_ip="10.0.0.2", hccn_conf=str(conf), output=str(tmp_path))
    devices = json.loads(open(path).read())["server_list"][0]["device"]
    assert [d["device_ip"] for d in devices] == NODE2_IPS


def test_fake_hccn_tool_with_visible_devices_queries_physical_ids(tmp_path, bin_dir):
    write_fake_tool(bin_dir, NODE2_IPS)
    path = make_rank_table("[0,2)", visible_devices="6,7", server_ip="10.0.0.2",
                           hccn_conf=str(tmp_path / "absent.conf"), output=str(tmp_path))
    devices = json.loads(open(path).read())["server_list"][0]["device"]
    assert devices == [{"device_id": "6", "device_ip": NODE2_IPS[6], "rank_id": "0"},
                       {"device_id": "7", "device_ip": NODE2_IPS[7], "rank_id": "1"}]


def test_failing_hccn_tool_falls_back_to_conf(tmp_path, conf, bin_dir, capsys):
    write_fake_tool(bin_dir, NODE2_IPS, fail={5})
    path = make_rank_table("[4,8)", server_ip="10.0.0.1", hccn_conf=str(conf), output=str(tmp_path))
    devices = json.loads(open(path).read())["server_list"][0]["device"]
    assert [d["device_ip"] for d in devices] == SEED_IPS[4:]
    err = capsys.readouterr().err
    assert "hccn_tool -i 5 -ip -g: exit status 1: Get ip failed, device 5 is not ready" in err
    assert f"reading {conf} instead" in err


def test_failing_hccn_tool_without_conf(tmp_path, bin_dir):
    write_fake_tool(bin_dir, NODE2_IPS, fail={0})
    missing = tmp_path / "nope.conf"
    with pytest.raises(RankTableError) as e:
        make_rank_table("[0,2)", server_ip="10.0.0.1", hccn_conf=str(missing), output=str(tmp_path / "out"))
    assert str(e.value) == ("hccn_tool -i 0 -ip -g: exit status 1: Get ip failed, device 0 is not ready; "
                            f"and {missing} does not exist")
    assert not (tmp_path / "out").exists()


def test_hccn_tool_output_without_ipaddr(tmp_path, bin_dir):
    tool = bin_dir / "hccn_tool"
    tool.write_text("#!/bin/sh\necho 'netmask:255.255.255.0'\n")
    tool.chmod(0o755)
    with pytest.raises(RankTableError) as e:
        hccl_tools.query_hccn_tool(3)
    assert str(e.value) == "hccn_tool -i 3 -ip -g: no 'ipaddr:' line in its output"


def test_server_ip_checked_and_detected(tmp_path, conf, bin_dir):
    with pytest.raises(RankTableError) as e:
        make_rank_table("[0,1)", server_ip="10.0.0.256", hccn_conf=str(conf), output=str(tmp_path))
    assert str(e.value) == "--server_ip: '10.0.0.256' is not an IPv4 address"
    # Default: this host's address, named in the file.
    path = make_rank_table("[0,1)", hccn_conf=str(conf), output=str(tmp_path))
    server_id = json.loads(open(path).read())["server_list"][0]["server_id"]
    assert rank_table.is_ipv4(server_id)
    assert os.path.basename(path) == f"hccl_1p_0_{server_id}.json"


def test_failed_write_leaves_nothing(tmp_path, conf, bin_dir, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    real_dump = json.dump

    def dump_then_fail(obj, f, **kw):
        f.write('{"version": "1.0", ')  # half a table, then the disk "fills up"
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rank_table.json, "dump", dump_then_fail)
    with pytest.raises(RankTableError, match=r"hccl_8p_01234567_10.0.0.1.json: cannot write: No space left"):
        make_rank_table("[0,8)", server_ip="10.0.0.1", hccn_conf=str(conf), output=str(out))
    assert listing(out) == []
    monkeypatch.setattr(rank_table.json, "dump", real_dump)


def test_rewrite_replaces_the_old_table(tmp_path, bin_dir):
    write_conf(tmp_path / "a.conf", SEED_IPS)
    write_conf(tmp_path / "b.conf", NODE2_IPS)
    make_rank_table("[0,2)", server_ip="10.0.0.1", hccn_conf=str(tmp_path / "a.conf"), output=str(tmp_path))
    path = make_rank_table("[0,2)", server_ip="10.0.0.1", hccn_conf=str(tmp_path / "b.conf"),
                           output=str(tmp_path))
    assert json.loads(open(path).read())["server_list"][0]["device"][0]["device_ip"] == NODE2_IPS[0]


# ---- command line ----

def test_cli_writes_table(tmp_path, conf, bin_dir):
    res = run_cli("hccl_tools.py", "--device_num", "[0,8)", "--server_ip", "10.0.0.1",
                  "--hccn_conf", conf, "--output", tmp_path / "out", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    path = tmp_path / "out" / "hccl_8p_01234567_10.0.0.1.json"
    assert f"wrote {path}: 8 devices on server 10.0.0.1 (device IPs from {conf})" in res.stdout
    assert "rank_id:7, device_id:7, device_ip:192.4.27.7" in res.stdout
    assert check_file(str(path), "[0,8)") == []


def test_cli_default_output_is_cwd_and_fake_tool_used(tmp_path, bin_dir):
    write_fake_tool(bin_dir, NODE2_IPS)
    res = run_cli("hccl_tools.py", "--device_num", "[4,8)", "--server_ip", "10.0.0.2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "(device IPs from hccn_tool)" in res.stdout
    table = json.loads((tmp_path / "hccl_4p_4567_10.0.0.2.json").read_text())
    assert [d["device_ip"] for d in table["server_list"][0]["device"]] == NODE2_IPS[4:]


def test_cli_rule_violation_exit_1_one_line_nothing_written(tmp_path, conf, bin_dir):
    res = run_cli("hccl_tools.py", "--device_num", "[2,6)", "--server_ip", "10.0.0.1",
                  "--hccn_conf", conf, cwd=tmp_path)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        "error: --device_num: '[2,6)' crosses the device groups 0-3 and 4-7; a range must lie in one group "
        "([a,b) with b <= 4 or a >= 4) or be the whole node [0,8)"]
    assert listing(tmp_path) == ["bin", "hccn.conf"]


def test_cli_help_states_the_rules_and_bad_args_exit_2(tmp_path):
    res = run_cli("hccl_tools.py", "--help")
    assert res.returncode == 0
    assert "0 <= a < b <= --device_num_per_node" in res.stdout
    assert "[0,8) (or [0,16) with --device_num_per_node 16)" in res.stdout
    assert "--visible_devices" in res.stdout and "hccn_tool -i N -ip -g" in res.stdout
    res = run_cli("hccl_tools.py", "--device_num_per_node", "eight")
    assert res.returncode == 2
