"""hccl/validate.py: every problem it reports, one line each naming the file and the JSON path."""
import json

import pytest

from hccl.rank_table import RankTableError, is_ipv4
from hccl.validate import check_file, check_table, rank_plan, validate_file
from tests.hccl.conftest import dump, run_cli


def two_servers():
    """A valid 2-node table with 2 devices each, typed out by hand."""
    return {
        "version": "1.0",
        "server_count": "2",
        "server_list": [
            {"server_id": "10.0.0.1",
             "device": [{"device_id": "0", "device_ip": "192.1.27.6", "rank_id": "0"},
                        {"device_id": "1", "device_ip": "192.2.27.6", "rank_id": "1"}],
             "host_nic_ip": "reserve"},
            {"server_id": "10.0.0.2",
             "device": [{"device_id": "0", "device_ip": "192.1.28.6", "rank_id": "2"},
                        {"device_id": "1", "device_ip": "192.2.28.6", "rank_id": "3"}],
             "host_nic_ip": "reserve"},
        ],
        "status": "completed",
    }


def one_server():
    t = two_servers()
    del t["server_list"][1]
    t["server_count"] = "1"
    return t


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def errors_of(table, device_range=None, rank_size=None, name="hccl.json"):
    with open(name, "w") as f:
        json.dump(table, f, indent=4)
    return check_file(name, device_range, rank_size)


def set_path(table, path, value):
    """``path`` like ``server_list.1.device.0.rank_id``; value ``DELETE`` removes the key."""
    *head, last = path.split(".")
    obj = table
    for key in head:
        obj = obj[int(key)] if isinstance(obj, list) else obj[key]
    last = int(last) if isinstance(obj, list) else last
    if value is DELETE:
        del obj[last]
    else:
        obj[last] = value
    return table


DELETE = object()
S1D1 = "server_list.1.device.1"

# (path to change, new value, the exact error lines)
SHAPE_CASES = [
    ("version", DELETE, ["hccl.json: version: missing"]),
    ("server_count", DELETE, ["hccl.json: server_count: missing"]),
    ("status", DELETE, ["hccl.json: status: missing"]),
    ("server_list", DELETE, ["hccl.json: server_list: missing"]),
    ("version", "2.0", ["hccl.json: version: expected \"1.0\", got '2.0'"]),
    ("status", "initializing", ["hccl.json: status: expected \"completed\", got 'initializing'"]),
    ("server_count", 2, ["hccl.json: server_count: expected a number written as a string like \"2\", got 2"]),
    ("server_count", "two", ["hccl.json: server_count: 'two' is not a non-negative integer"]),
    ("server_count", "3", ["hccl.json: server_count: 3 does not match the 2 entries of server_list"]),
    ("server_list", {"a": 1}, ["hccl.json: server_list: expected a list, got an object"]),
    ("server_list", [], ["hccl.json: server_list: empty",
                         "hccl.json: server_count: 2 does not match the 0 entries of server_list"]),
    ("server_list.1", "10.0.0.2", ["hccl.json: server_list[1]: expected an object, got a string"]),
    ("server_list.1.server_id", DELETE, ["hccl.json: server_list[1].server_id: missing"]),
    ("server_list.1.device", DELETE, ["hccl.json: server_list[1].device: missing"]),
    ("server_list.1.server_id", "node-2", ["hccl.json: server_list[1].server_id: 'node-2' is not an IPv4 address"]),
    ("server_list.1.server_id", "10.0.0.1",
     ["hccl.json: server_list[1].server_id: '10.0.0.1' repeats server_list[0].server_id"]),
    ("server_list.1.host_nic_ip", None, ["hccl.json: server_list[1].host_nic_ip: expected a string, got null"]),
    ("server_list.1.device", "0,1", ["hccl.json: server_list[1].device: expected a list, got a string"]),
    ("server_list.1.device.1", ["1", "192.2.28.6", "3"],
     ["hccl.json: server_list[1].device[1]: expected an object, got a list"]),
    (S1D1 + ".device_id", DELETE, ["hccl.json: server_list[1].device[1].device_id: missing"]),
    (S1D1 + ".device_ip", DELETE, ["hccl.json: server_list[1].device[1].device_ip: missing"]),
    (S1D1 + ".rank_id", DELETE, ["hccl.json: server_list[1].device[1].rank_id: missing"]),
    (S1D1 + ".device_id", 1,
     ["hccl.json: server_list[1].device[1].device_id: expected a number written as a string like \"1\", got 1"]),
    (S1D1 + ".device_id", "0", ["hccl.json: server_list[1].device[1].device_id: device 0 repeats "
                                "server_list[1].device[0].device_id"]),
    (S1D1 + ".device_id", "-1", ["hccl.json: server_list[1].device[1].device_id: '-1' is not a non-negative integer"]),
    (S1D1 + ".device_ip", "10.0.0.300",
     ["hccl.json: server_list[1].device[1].device_ip: '10.0.0.300' is not an IPv4 address"]),
    (S1D1 + ".device_ip", "192.2.28",
     ["hccl.json: server_list[1].device[1].device_ip: '192.2.28' is not an IPv4 address"]),
    (S1D1 + ".device_ip", "192.02.28.6",
     ["hccl.json: server_list[1].device[1].device_ip: '192.02.28.6' is not an IPv4 address"]),
    (S1D1 + ".device_ip", 3232235777,
     ["hccl.json: server_list[1].device[1].device_ip: 3232235777 is not an IPv4 address"]),
    (S1D1 + ".device_ip", "192.1.27.6", ["hccl.json: server_list[1].device[1].device_ip: '192.1.27.6' repeats "
                                         "server_list[0].device[0].device_ip"]),
    (S1D1 + ".rank_id", 3,
     ["hccl.json: server_list[1].device[1].rank_id: expected a number written as a string like \"3\", got 3"]),
    (S1D1 + ".rank_id", "r3", ["hccl.json: server_list[1].device[1].rank_id: 'r3' is not a non-negative integer"]),
    (S1D1 + ".rank_id", "1", ["hccl.json: server_list[1].device[1].rank_id: rank 1 repeats "
                              "server_list[0].device[1].rank_id"]),
    (S1D1 + ".rank_id", "4", ["hccl.json: server_list[1].device[1].rank_id: rank 4 is out of range: the table has "
                              "4 devices, so rank ids run 0..3"]),
]


@pytest.mark.parametrize("path,value,expected", SHAPE_CASES,
                         ids=[f"{c[0]}={'<deleted>' if c[1] is DELETE else repr(c[1])}"[:60] for c in SHAPE_CASES])
def test_each_shape_error(in_tmp, path, value, expected):
    table = set_path(two_servers(), path, value)
    assert errors_of(table) == expected


def test_empty_device_list(in_tmp):
    table = two_servers()
    table["server_list"][1]["device"] = []
    assert errors_of(table) == ["hccl.json: server_list[1].device: empty"]


def test_top_level_not_an_object(in_tmp):
    assert errors_of([one_server()]) == ["hccl.json: (top level): expected an object, got a list"]


def test_unreadable_and_invalid_json(in_tmp):
    assert check_file("absent.json") == ["absent.json: cannot read: No such file or directory"]
    (in_tmp / "bad.json").write_text('{\n    "version": "1.0",\n    "server_count": "1"\n    "status": 1\n}')
    assert check_file("bad.json") == ["bad.json:4:5: invalid JSON: Expecting ',' delimiter"]


def test_many_errors_all_reported(in_tmp):
    table = two_servers()
    table["server_list"][0]["device"][1]["device_ip"] = "1.2.3"
    table["server_list"][1]["device"][0]["rank_id"] = "0"
    table["status"] = "done"
    assert errors_of(table) == [
        "hccl.json: status: expected \"completed\", got 'done'",
        "hccl.json: server_list[0].device[1].device_ip: '1.2.3' is not an IPv4 address",
        "hccl.json: server_list[1].device[0].rank_id: rank 0 repeats server_list[0].device[0].rank_id",
    ]


def test_valid_tables_pass(in_tmp):
    assert errors_of(one_server()) == []
    assert errors_of(two_servers()) == []
    # host_nic_ip is optional; rank ids need not follow list order
    table = two_servers()
    del table["server_list"][0]["host_nic_ip"]
    table["server_list"][1]["device"][0]["rank_id"] = "3"
    table["server_list"][1]["device"][1]["rank_id"] = "2"
    assert errors_of(table) == []


# ---- the launch arguments against the table ----

def on_devices(table, *devices):
    for d, dev in zip(table["server_list"][0]["device"], devices):
        d["device_id"] = str(dev)
    return table


def test_single_node_range_matches(in_tmp):
    assert errors_of(one_server(), "[0,2)") == []
    assert errors_of(on_devices(one_server(), 6, 7), "[6,8]") == []  # '[a,b]' reads as b excluded, as the launcher
    assert errors_of(on_devices(one_server(), 7, 6), "[6,8)") == []  # any order: each rank takes its entry's device
    assert errors_of(one_server(), "[0,4)") == [
        "hccl.json: device range [0,4) starts 4 ranks, but the table lists 2 devices"]


def test_single_node_table_must_name_the_devices_of_the_range(in_tmp):
    assert errors_of(on_devices(one_server(), 2, 3), "[0,2)") == [
        "hccl.json: server_list[0].device: the table names devices 2, 3, but device range [0,2) is devices 0, 1: "
        "the ranks would bind devices the table does not name"]
    assert errors_of(one_server(), "[6,8]") == [
        "hccl.json: server_list[0].device: the table names devices 0, 1, but device range [6,8) is devices 6, 7: "
        "the ranks would bind devices the table does not name"]


def test_device_ids_exist_on_the_node(in_tmp):
    table = on_devices(one_server(), 0, 9)
    expected = ["hccl.json: server_list[0].device[1].device_id: device 9 does not exist on a node of 8 devices (0..7)"]
    with open("hccl.json", "w") as f:
        json.dump(table, f)
    assert check_file("hccl.json", "[0,2)", device_count=8) == expected
    assert check_file("hccl.json", device_count=8) == expected
    assert check_file("hccl.json", device_count=16) == []
    res = run_cli("validate.py", "hccl.json", "--device-count", "8", cwd=in_tmp)
    assert res.returncode == 1 and res.stderr.strip() == expected[0]
    assert check_file("hccl.json", "[8,10)", device_count=8) != []


def test_rank_plan_takes_each_ranks_device_from_the_table(in_tmp):
    table = on_devices(one_server(), 3, 2)
    assert rank_plan("[2,4)", None, table) == [(0, 3), (1, 2)]
    t2 = two_servers()
    t2["server_list"][1]["device"][0]["device_id"], t2["server_list"][1]["device"][1]["device_id"] = "1", "0"
    assert rank_plan("[2,4)", 4, t2) == [(2, 1), (3, 0)]
    dump(in_tmp / "t.json", table)
    res = run_cli("validate.py", "t.json", "--device-range", "[2,4)", "--plan", cwd=in_tmp)
    assert res.returncode == 0 and res.stdout.split("\n")[:2] == ["0 3", "1 2"], res.stderr


def test_single_node_launch_needs_one_server(in_tmp):
    assert errors_of(two_servers(), "[0,4)") == [
        "hccl.json: server_list: the table lists 2 servers, but a launch without RANK_SIZE starts one node; "
        "pass RANK_SIZE (4) for a multi-node table"]


def test_multi_node_rank_size_and_range(in_tmp):
    assert errors_of(two_servers(), "[0,2)", 4) == []
    assert errors_of(two_servers(), "[2,4)", 4) == []
    assert errors_of(two_servers(), None, 4) == []
    assert errors_of(two_servers(), "[0,2)", 8) == ["hccl.json: RANK_SIZE 8 does not match the table's 4 devices"]
    assert errors_of(two_servers(), "[2,6)", 4) == [
        "hccl.json: device range [2,6) names ranks up to 5, past RANK_SIZE 4 (ranks 0..3)"]
    assert errors_of(two_servers(), "[1,3)", 4) == [
        "hccl.json: device range [1,3): ranks 1..2 are on 2 servers (server_list[0] (10.0.0.1), "
        "server_list[1] (10.0.0.2)); one node's ranks must be on one server"]


@pytest.mark.parametrize("rng,rank_size,expected", [
    ("0-2", None, "hccl.json: device range: '0-2' is not a range like \"[0,8)\" (start included, end excluded)"),
    ("[2,2)", None, "hccl.json: device range: '[2,2)' is empty: the start 2 must be less than the end 2"),
    ("[0,2)", 0, "hccl.json: RANK_SIZE: 0 is not a positive integer"),
    ("[0,2)", "four", "hccl.json: RANK_SIZE: 'four' is not a positive integer"),
])
def test_bad_launch_arguments(in_tmp, rng, rank_size, expected):
    assert errors_of(one_server(), rng, rank_size) == [expected]


def test_python_api(in_tmp):
    dump(in_tmp / "ok.json", two_servers())
    assert validate_file("ok.json", "[2,4)", 4) == two_servers()
    with pytest.raises(RankTableError) as e:
        validate_file("ok.json", "[0,4)")
    assert e.value.errors == ["ok.json: server_list: the table lists 2 servers, but a launch without RANK_SIZE "
                              "starts one node; pass RANK_SIZE (4) for a multi-node table"]
    assert check_table(two_servers(), "cluster") == []
    assert check_table(set_path(two_servers(), "version", 1), "cluster") == [
        "cluster: version: expected \"1.0\", got 1"]
    # run_distribute.sh's assignment: one node -> (rank i-a, device i); several -> (rank i, device i-a)
    assert rank_plan("[4,8)") == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert rank_plan("[8,16)", 16) == [(8 + i, i) for i in range(8)]


@pytest.mark.parametrize("text,ok", [("0.0.0.0", True), ("255.255.255.255", True), ("192.168.1.10", True),
                                     ("256.1.1.1", False), ("1.2.3", False), ("1.2.3.4.5", False),
                                     ("01.2.3.4", False), (" 1.2.3.4", False), ("1.2.3.4\n", False),
                                     ("a.b.c.d", False), ("", False), (None, False), (16909060, False),
                                     ("\u0661.2.3.4", False)])
def test_ipv4(text, ok):
    assert is_ipv4(text) is ok


# ---- command line ----

def test_cli_valid(in_tmp):
    dump(in_tmp / "cluster.json", two_servers())
    res = run_cli("validate.py", "cluster.json", "--device-range", "[2,4)", "--rank-size", "4", cwd=in_tmp)
    assert (res.returncode, res.stdout, res.stderr) == (0, "cluster.json: ok: 2 servers, 4 ranks\n", "")
    res = run_cli("validate.py", "cluster.json", "--device_range", "[2,4)", "--rank_size", "4", "--plan", cwd=in_tmp)
    assert (res.returncode, res.stdout) == (0, "2 0\n3 1\n")
    res = run_cli("validate.py", "cluster.json", "-q", cwd=in_tmp)
    assert (res.returncode, res.stdout) == (0, "")


def test_cli_invalid_one_line_per_problem(in_tmp):
    table = two_servers()
    table["server_list"][1]["device"][1]["device_ip"] = "10.0.0.300"
    dump(in_tmp / "hccl.json", table)
    res = run_cli("validate.py", "hccl.json", "--device-range", "[0,4)", cwd=in_tmp)
    assert res.returncode == 1
    assert res.stdout == ""
    assert res.stderr.splitlines() == [
        "hccl.json: server_list[1].device[1].device_ip: '10.0.0.300' is not an IPv4 address",
        "hccl.json: server_list: the table lists 2 servers, but a launch without RANK_SIZE starts one node; "
        "pass RANK_SIZE (4) for a multi-node table"]


def test_cli_as_module_and_usage_errors(in_tmp):
    import subprocess
    import sys
    from tests.conftest import ROOT
    dump(in_tmp / "one.json", one_server())
    res = subprocess.run([sys.executable, "-m", "hccl.validate", str(in_tmp / "one.json"), "--device-range", "[0,2)"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 0 and res.stdout.endswith("one.json: ok: 1 server, 2 ranks\n")
    assert run_cli("validate.py", "one.json", "--plan", cwd=in_tmp).returncode == 2
    assert run_cli("validate.py", "one.json", "--rank-size", "x", cwd=in_tmp).returncode == 2
    assert run_cli("validate.py", cwd=in_tmp).returncode == 2
    res = run_cli("validate.py", "absent.json", cwd=in_tmp)
    assert (res.returncode, res.stderr) == (1, "absent.json: cannot read: No such file or directory\n")
