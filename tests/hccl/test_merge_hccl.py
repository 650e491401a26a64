"""hccl/merge_hccl.py: per-node tables (written by hccl_tools) merged into the cluster's table."""
import json

import pytest

from hccl.hccl_tools import make_rank_table
from hccl.merge_hccl import merge_files, merge_tables
from hccl.rank_table import RankTableError
from hccl.validate import check_file
from tests.hccl.conftest import NODE2_IPS, SEED_IPS, dump, run_cli, seed_table, write_conf


@pytest.fixture
def two_nodes(tmp_path, bin_dir):
    """Each node runs hccl_tools.py on its own hccn.conf, as a user does on a cluster."""
    a = make_rank_table("[0,8)", server_ip="10.0.0.1", output=str(tmp_path),
                        hccn_conf=str(write_conf(tmp_path / "node1.conf", SEED_IPS)))
    b = make_rank_table("[0,8)", server_ip="10.0.0.2", output=str(tmp_path),
                        hccn_conf=str(write_conf(tmp_path / "node2.conf", NODE2_IPS)))
    return a, b


def expected_cluster():
    """The merged table typed out: node 1's devices are ranks 0..7, node 2's ranks 8..15."""
    return {
        "version": "1.0",
        "server_count": "2",
        "server_list": [
            {"server_id": "10.0.0.1",
             "device": [{"device_id": str(i), "device_ip": SEED_IPS[i], "rank_id": str(i)} for i in range(8)],
             "host_nic_ip": "reserve"},
            {"server_id": "10.0.0.2",
             "device": [{"device_id": str(i), "device_ip": NODE2_IPS[i], "rank_id": str(8 + i)} for i in range(8)],
             "host_nic_ip": "reserve"},
        ],
        "status": "completed",
    }


def test_two_nodes_merged(tmp_path, two_nodes, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = merge_files(list(two_nodes))
    assert path == str(tmp_path / "hccl_2s_16p.json")
    text = open(path).read()
    assert text == json.dumps(expected_cluster(), indent=4)  # key order and strings included
    # the launcher's view: node 1 starts ranks [0,8), node 2 ranks [8,16) of RANK_SIZE 16
    assert check_file(path, "[0,8)", 16) == []
    assert check_file(path, "[8,16)", 16) == []
    assert check_file(path, "[4,12)", 16) != []


def test_order_of_files_is_rank_order(tmp_path, two_nodes):
    a, b = two_nodes
    path = merge_files([b, a], str(tmp_path / "swapped.json"))
    servers = json.loads(open(path).read())["server_list"]
    assert [s["server_id"] for s in servers] == ["10.0.0.2", "10.0.0.1"]
    assert [d["rank_id"] for s in servers for d in s["device"]] == [str(r) for r in range(16)]
    assert servers[0]["device"][0]["device_ip"] == NODE2_IPS[0]


def test_partial_nodes_and_merged_inputs(tmp_path):
    # three 2-device tables; the first two merged first, then merged again with the third
    t1 = dump(tmp_path / "t1.json", seed_table("10.0.0.1", SEED_IPS[:2]))
    t2 = dump(tmp_path / "t2.json", seed_table("10.0.0.2", SEED_IPS[2:4]))
    t3 = dump(tmp_path / "t3.json", seed_table("10.0.0.3", SEED_IPS[4:6]))
    m12 = merge_files([str(t1), str(t2)], str(tmp_path / "m12.json"))
    m = json.loads(open(merge_files([m12, str(t3)], str(tmp_path / "all.json"))).read())
    assert m["server_count"] == "3"
    assert [(s["server_id"], [(d["device_ip"], d["rank_id"]) for d in s["device"]]) for s in m["server_list"]] == [
        ("10.0.0.1", [(SEED_IPS[0], "0"), (SEED_IPS[1], "1")]),
        ("10.0.0.2", [(SEED_IPS[2], "2"), (SEED_IPS[3], "3")]),
        ("10.0.0.3", [(SEED_IPS[4], "4"), (SEED_IPS[5], "5")]),
    ]


def test_duplicate_server_id_and_device_ip(tmp_path):
    a = dump(tmp_path / "a.json", seed_table("10.0.0.1", SEED_IPS[:2]))
    b = dump(tmp_path / "b.json", seed_table("10.0.0.1", [NODE2_IPS[0], SEED_IPS[1]]))
    out = tmp_path / "out.json"
    with pytest.raises(RankTableError) as e:
        merge_files([str(a), str(b)], str(out))
    assert e.value.errors == [
        f"{b}: server_list[0].server_id: '10.0.0.1' is already in {a}: server_list[0].server_id",
        f"{b}: server_list[0].device[1].device_ip: '{SEED_IPS[1]}' is already in "
        f"{a}: server_list[0].device[1].device_ip",
    ]
    assert not out.exists()


def test_bad_input_is_reported_and_nothing_written(tmp_path):
    a = dump(tmp_path / "a.json", seed_table("10.0.0.1", SEED_IPS[:2]))
    bad = seed_table("10.0.0.2", NODE2_IPS[:2])
    bad["server_list"][0]["device"][1]["device_ip"] = "192.2.28.999"
    b = dump(tmp_path / "b.json", bad)
    with pytest.raises(RankTableError) as e:
        merge_files([str(a), str(b), str(tmp_path / "c.json")], str(tmp_path / "out.json"))
    assert e.value.errors == [
        f"{b}: server_list[0].device[1].device_ip: '192.2.28.999' is not an IPv4 address",
        f"{tmp_path / 'c.json'}: cannot read: No such file or directory",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]


def test_merge_tables_keeps_input_untouched():
    a, b = seed_table("10.0.0.1", SEED_IPS[:2]), seed_table("10.0.0.2", NODE2_IPS[:2])
    merged = merge_tables([a, b])
    assert a == seed_table("10.0.0.1", SEED_IPS[:2]) and b == seed_table("10.0.0.2", NODE2_IPS[:2])
    assert [d["rank_id"] for d in merged["server_list"][1]["device"]] == ["2", "3"]
    with pytest.raises(RankTableError):
        merge_tables([])


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    from hccl import rank_table
    a = dump(tmp_path / "a.json", seed_table("10.0.0.1", SEED_IPS[:2]))
    b = dump(tmp_path / "b.json", seed_table("10.0.0.2", NODE2_IPS[:2]))

    def dump_then_fail(obj, f, **kw):
        f.write('{"version": "1.0", ')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rank_table.json, "dump", dump_then_fail)
    with pytest.raises(RankTableError, match=r"cluster.json: cannot write: No space left"):
        merge_files([str(a), str(b)], str(tmp_path / "cluster.json"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]


# ---- command line ----

def test_cli_merge(tmp_path, two_nodes):
    res = run_cli("merge_hccl.py", *two_nodes, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"wrote {tmp_path / 'hccl_2s_16p.json'}: 2 servers, 16 ranks\n"
    assert json.loads((tmp_path / "hccl_2s_16p.json").read_text()) == expected_cluster()
    res = run_cli("merge_hccl.py", *two_nodes, "--output", tmp_path / "sub" / "cluster.json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "sub" / "cluster.json").read_text()) == expected_cluster()


def test_cli_duplicate_exit_1(tmp_path, two_nodes):
    a, _ = two_nodes
    res = run_cli("merge_hccl.py", a, a, "-o", tmp_path / "x.json", cwd=tmp_path)
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert lines[0] == f"{a}: server_list[0].server_id: '10.0.0.1' is already in {a}: server_list[0].server_id"
    assert len(lines) == 9  # the server id and the eight device IPs
    assert not (tmp_path / "x.json").exists()
    assert run_cli("merge_hccl.py", cwd=tmp_path).returncode == 2
