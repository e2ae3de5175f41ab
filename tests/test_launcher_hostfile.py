"""Hostfile parsing: the DeepSpeed `host slots=N` format, and one clear line for each kind of mistake."""
import pytest

from conftest import ROOT, run_cli
from launcher.hostfile import load, parse
from sdarts.errors import HostfileError


def test_valid_file_with_comments_blank_lines_and_inline_comments():
    hf = parse("# cluster A\n\nworker-1 slots=8   # first node\n  10.0.0.2 slots=4\nnode_3.cluster.local slots=2\n",
               "hf")
    assert [(h.name, h.slots, h.line) for h in hf.hosts] == [("worker-1", 8, 3), ("10.0.0.2", 4, 4),
                                                            ("node_3.cluster.local", 2, 5)]
    assert hf.world_size == 14 and hf.num_nodes == 3 and hf.first_host == "worker-1"


@pytest.mark.parametrize("text, line, words", [
    ("a slots=2\na slots=4\n", 2, ["'a'", "listed twice", "line 1"]),
    ("# x\nnode1 slots=0\n", 2, ["'node1'", "slots=0"]),
    ("node1 slots=four\n", 1, ["'node1'", "whole number", "'four'"]),
    ("node1 slots=-1\n", 1, ["'node1'", "whole number"]),
    ("node1 slots=2.5\n", 1, ["'node1'", "whole number"]),
    ("node1 slots=\n", 1, ["'node1'", "whole number"]),
    ("node1\n", 1, ["'node1'", "missing 'slots=N'"]),
    ("node1 gpus=4\n", 1, ["'node1'", "expected 'slots=N'"]),
    ("node1 slots=4 extra\n", 1, ["'node1'", "unexpected text"]),
    ("slots=4\n", 1, ["missing host name"]),
    ("ok slots=1\nbad@host slots=4\n", 2, ["'bad@host'", "not a valid host name"]),
    ("-node slots=4\n", 1, ["'-node'", "not a valid host name"]),
    ("node:1 slots=4\n", 1, ["'node:1'", "not a valid host name"]),
    ("a..b slots=4\n", 1, ["'a..b'", "not a valid host name"]),
])
def test_each_invalid_line_is_one_error_naming_file_line_and_host(text, line, words):
    with pytest.raises(HostfileError) as e:
        parse(text, "hosts.txt")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"hosts.txt:{line}: "), msg
    for w in words:
        assert w in msg, (w, msg)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(HostfileError, match="no hosts"):
        parse("# only a comment\n\n", "empty")
    with pytest.raises(HostfileError, match="hostfile not found"):
        load(tmp_path / "nope")


def test_shipped_hostfiles_parse():
    assert load(ROOT / "hostfiles/localhost").world_size == 1
    one = load(ROOT / "hostfiles/2080ti-1node-8gpu")
    assert (one.num_nodes, one.world_size) == (1, 8)
    four = load(ROOT / "hostfiles/2080ti-4nodes-4gpu")
    assert (four.num_nodes, four.world_size, four.slots_per_node) == (4, 16, [4, 4, 4, 4])


def test_plan_cli_reports_a_bad_hostfile_as_one_line_exit_2(tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("gpu1 slots=8\ngpu2 slots=zero\n")
    r = run_cli(["launcher/plan.py", "--job", "configs/search/smoke.yaml", "--hostfile", str(hf), "--gpu", "cpu"],
                timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"error: {hf}:2: host 'gpu2': slots must be a whole number, got 'zero'"
    assert r.stdout == ""
