"""The bad-input catalogue, one table: each case through the real CLI gives exit code 2, exactly one
`error:` line naming the culprit, no traceback, and leaves existing run directories untouched.

"Untouched" is checked on a finished search and a finished retrain run directory (made once per
session, see reliability_runs.py): most cases aim the bad input at them with --resume, the way a user
resuming a week-old run with a mistyped override would, and every entry of both trees (size, sha256,
mtime) must be the same afterwards. Cases that need a damaged run directory damage a copy, and the
copy must not change either.
"""
import io
import pickle
import shutil
import tarfile

import pytest

from conftest import ROOT, need_data
from reliability_runs import SEARCH, error_lines, finished_retrain, finished_search, latest, retrain_cmd, run, tree

pytestmark = pytest.mark.slow


class _Boom:
    """A pickle that runs a shell command when unpickled (what a crafted checkpoint would carry)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def _wds(root, members, *, corrupt=None, truncate=None):
    """CIFAR-10 WebDataset shards from real CIFAR-10 JPEGs: train-000000/1.tar and test-000000.tar."""
    root.mkdir()
    split = {"train-000000.tar": members[:16], "train-000001.tar": members[16:32], "test-000000.tar": members[32:]}
    for name, samples in split.items():
        with tarfile.open(root / name, "w") as tf:
            for key, jpg, cls in samples:
                if key == corrupt:
                    jpg = jpg[:200] + bytes(range(256)) * 4  # header intact, entropy-coded data garbage
                for ext, data in (("jpg", jpg), ("cls", cls)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    if truncate:
        data = (root / truncate).read_bytes()
        (root / truncate).write_bytes(data[:len(data) // 2])
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The existing runs, and every bad input of the catalogue as files."""
    S, R = finished_search(tmp_path_factory), finished_retrain(tmp_path_factory)
    d = tmp_path_factory.mktemp("bad_inputs")
    w = {"S": S, "R": R, "d": d}

    (d / "malformed.yaml").write_text("seed: 0\nepochs: [1, 2\nspace: nb201\n")
    (d / "unknown_key.yaml").write_text((ROOT / "configs/retrain/cifar10.yaml").read_text() + "modle:\n  C: 4\n")
    (d / "unknown_op.json").write_text(
        '{"space": "darts", "normal": [["sep_conv_9x9", 0], ["sep_conv_3x3", 1], ["sep_conv_3x3", 0], '
        '["sep_conv_3x3", 1], ["sep_conv_3x3", 1], ["skip_connect", 0], ["skip_connect", 0], ["dil_conv_3x3", 2]], '
        '"normal_concat": [2, 3, 4, 5], "reduce": [["max_pool_3x3", 0], ["max_pool_3x3", 1], ["skip_connect", 2], '
        '["max_pool_3x3", 1], ["max_pool_3x3", 0], ["skip_connect", 2], ["skip_connect", 2], ["max_pool_3x3", 1]], '
        '"reduce_concat": [2, 3, 4, 5]}')
    (d / "five_edges.json").write_text('{"space": "nb201", "arch": "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|'
                                       '+|skip_connect~0|nor_conv_3x3~1|"}')
    w["pwned"] = d / "pwned"
    (d / "code.txt").write_text(f"Genotype(normal=__import__('os').system('touch {w['pwned']}'), "
                                f"normal_concat=[2], reduce=[], reduce_concat=[2])")
    (d / "hosts").write_text("gpu1 slots=8\ngpu2 slots=zero\n")

    with tarfile.open(need_data("cifar10-wds", "train-000000.tar")) as tf:
        files = {}
        for m in tf:
            files[m.name] = tf.extractfile(m).read()
            if len(files) >= 96:
                break
    stems = sorted({n.rpartition(".")[0] for n in files})
    keys = [k for k in stems if f"{k}.jpg" in files and f"{k}.cls" in files][:40]
    members = [(k, files[f"{k}.jpg"], files[f"{k}.cls"]) for k in keys]
    w["corrupt_key"] = keys[5]
    _wds(d / "wds_corrupt", members, corrupt=keys[5])
    _wds(d / "wds_truncated", members, truncate="train-000001.tar")

    def damaged_copy(src, name, payload):
        dst = d / name
        shutil.copytree(src, dst)
        pt = dst / "checkpoints" / latest(dst) / "mp_rank_00_model_states.pt"
        pt.write_bytes(payload)
        return dst, pt

    w["S_text"], w["S_text_pt"] = damaged_copy(S, "search_text_ckpt", b"hello, not a checkpoint")
    w["R_pickle"], w["R_pickle_pt"] = damaged_copy(R, "retrain_pickle_ckpt",
                                                   pickle.dumps({"module": _Boom(d / "pwned_ckpt")}))
    w["R_junk"], w["R_junk_pt"] = damaged_copy(R, "retrain_junk_ckpt", b"\x80\x04junk" * 100)
    return w


def _search(w, *extra, target="S"):
    return [*SEARCH, *extra, "--run-dir", str(w[target]), "--resume"]


def _retrain(w, *extra, target="R"):
    return [*retrain_cmd(), *extra, "--run-dir", str(w[target]), "--resume"]


# id: (argv from the world, the words the one error line must contain, the copy that must not change)
CASES = {
    "malformed_yaml": (lambda w: _search(w, "--config", str(w["d"] / "malformed.yaml")),
                       lambda w: ["malformed.yaml", "malformed YAML"], None),
    "unknown_key": (lambda w: _retrain(w, "--config", str(w["d"] / "unknown_key.yaml")),
                    lambda w: ["unknown_key.yaml", "modle"], None),
    "wrong_type": (lambda w: _search(w, "--set", "data.micro_batch=abc"), lambda w: ["data.micro_batch"], None),
    "negative_batch": (lambda w: _retrain(w, "--set", "data.micro_batch=-4"), lambda w: ["data.micro_batch"], None),
    "unknown_op": (lambda w: ["launcher/cli.py", "summary", "--genotype", str(w["d"] / "unknown_op.json")],
                   lambda w: ["unknown_op.json", "sep_conv_9x9"], None),
    "wrong_number_of_edges": (lambda w: _retrain(w, "--genotype", str(w["d"] / "five_edges.json")),
                              lambda w: ["five_edges.json", "node 3 needs 3 inputs"], None),
    "genotype_with_code": (lambda w: ["launcher/cli.py", "export", "--genotype", str(w["d"] / "code.txt"),
                                      "--out", str(w["d"] / "export_code")],
                           lambda w: ["code.txt", "refused"], None),
    "hostfile_bad_line": (lambda w: ["launcher/plan.py", "--job", "configs/search/smoke.yaml", "--hostfile",
                                     str(w["d"] / "hosts"), "--gpu", "cpu"],
                          lambda w: [f"{w['d'] / 'hosts'}:2", "gpu2", "slots"], None),
    "missing_dataset": (lambda w: _search(w, "--set", "data.dataset=cifar10", "--set", "data.root=/nonexistent/cifar10"),
                        lambda w: ["/nonexistent/cifar10"], None),
    "corrupt_jpeg": (lambda w: _retrain(w, "--set", f"data.root={w['d'] / 'wds_corrupt'}"),
                     lambda w: [f"{w['corrupt_key']}.jpg", "corrupt JPEG"], None),
    "truncated_shard": (lambda w: _search(w, "--set", "data.dataset=cifar10", "--set",
                                          f"data.root={w['d'] / 'wds_truncated'}"),
                        lambda w: ["train-000001.tar", "truncated"], None),
    "checkpoint_from_other_space": (lambda w: _search(w, "--set", "space=darts", "--set", "model.layers=3"),
                                    lambda w: [str(w["S"] / "checkpoints" / latest(w["S"]))], None),
    "checkpoint_not_a_checkpoint": (lambda w: _search(w, target="S_text"), lambda w: [str(w["S_text_pt"])], "S_text"),
    "checkpoint_crafted_pickle": (lambda w: _retrain(w, target="R_pickle"),
                                  lambda w: [str(w["R_pickle_pt"]), "refused"], "R_pickle"),
    "checkpoint_junk_export": (lambda w: ["launcher/cli.py", "export", "--run-dir", str(w["R_junk"]),
                                          "--out", str(w["d"] / "export_junk")],
                               lambda w: [str(w["R_junk_pt"])], "R_junk"),
    "checkpoint_of_other_genotype": (lambda w: _retrain(w, "--genotype", "pdarts"),
                                     lambda w: [str(w["R"]), "another genotype"], None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_touches_nothing(world, case):
    argv, culprits, copy = CASES[case]
    watched = [world["S"], world["R"]] + ([world[copy]] if copy else [])
    before = [tree(p) for p in watched]
    r = run(argv(world))
    assert r.returncode == 2, (r.returncode, r.stderr[-2500:])
    assert "Traceback" not in r.stderr, r.stderr[-2500:]
    lines = error_lines(r.stderr)
    assert len(lines) == 1, r.stderr[-2500:]
    for word in culprits(world):
        assert word in lines[0], (word, lines[0])
    assert [tree(p) for p in watched] == before, "an existing run directory changed"
    assert not world["pwned"].exists() and not (world["d"] / "pwned_ckpt").exists(), "user text was executed"
    assert not (world["d"] / "export_code").exists() and not (world["d"] / "export_junk").exists()
