"""Bad genotype files of every kind, through the real CLIs: exit code 2, exactly one `error:` line on
stderr that names the file and what is wrong with it, no traceback, nothing written.

Every kind goes through `sdarts nb201` (it reads the genotype before anything else and starts in a
fraction of a second); the entry points that import torch first (`launcher/retrain.py`,
`sdarts export`, `sdarts summary`) get the kinds that fail before parsing (binary, a directory) and
one that fails in parsing, since all four read the file through `sdarts.genotype.load`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import PYTHON, ROOT, run_cli
from sdarts.genotype import LITERATURE, MAX_FILE_BYTES, load

_NB201_OK = "|nor_conv_3x3~0|+|nor_conv_3x3~0|skip_connect~1|+|skip_connect~0|nor_conv_3x3~1|avg_pool_3x3~2|"
_DARTS_OK = LITERATURE["darts_v2"].to_json()


def _darts(**over) -> str:
    return json.dumps({**_DARTS_OK, **over})


def _write(text: str | bytes):
    def make(path: Path) -> Path:
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
        return path
    return make


def _directory(path: Path) -> Path:
    path.mkdir()
    (path / "genotype.json").write_text(json.dumps({"space": "nb201", "arch": _NB201_OK}))
    return path


def _fifo(path: Path) -> Path:
    os.mkfifo(path)  # opening it for reading would block forever: it must be refused unopened
    return path


def _huge(path: Path) -> Path:
    # a valid genotype padded past the cap: refused for its size, never read whole
    path.write_text(json.dumps({"space": "nb201", "arch": _NB201_OK}) + " " * MAX_FILE_BYTES)
    return path


#: kind -> (how to make the file, a fragment the error line must contain besides the file name)
KINDS = {
    "binary": (_write(bytes([0xb1, 0x9c, 0x00, 0xff]) * 64), "binary, not a genotype file (byte 0xb1 at offset 0"),
    "nul_bytes": (_write(b"\x00\x00{}"), "binary, not a genotype file (NUL byte"),
    "empty": (_write(""), "empty file"),
    "whitespace": (_write(" \n\t\n"), "empty file"),
    "huge": (_huge, "larger than 1048576 bytes (1 MiB)"),
    "directory": (_directory, "is a directory"),
    "fifo": (_fifo, "not a regular file"),
    "json_list": (_write("[1, 2, 3]\n"), "must be an object with a 'space' key, got a list"),
    "json_number": (_write("42\n"), "got a number"),
    "json_string": (_write('"darts_v2"\n'), "got a string"),
    "bad_json": (_write('{"space": "nb201", "arch": }'), "genotype JSON does not parse"),
    "nested_too_deep": (_write("[" * 200_000), "nested too deeply"),
    "unknown_space": (_write('{"space": "resnet"}'), "'space' must be 'nb201' or 'darts', got 'resnet'"),
    "missing_key": (_write(json.dumps({k: v for k, v in _DARTS_OK.items() if k != "reduce"})),
                    "missing key 'reduce'"),
    "extra_key": (_write(_darts(steps=4)), "unknown key 'steps'"),
    "concat_not_a_list": (_write(_darts(normal_concat=5)), "normal_concat: expected a list of node numbers, got 5"),
    "pairs_not_a_list": (_write(_darts(reduce="max_pool_3x3")), "reduce: expected a list of (op, input) pairs"),
    "pair_not_a_pair": (_write(_darts(normal=[["sep_conv_3x3"]] * 8)), "normal[0]: expected [op, input]"),
    "input_not_int": (_write(_darts(normal=[["sep_conv_3x3", "0"]] * 8)), "normal[0]: input '0' is not an earlier node"),
    "arch_not_a_string": (_write('{"space": "nb201", "arch": 7}'), "'arch' must be an arch string, got 7"),
    "unknown_darts_op": (_write(_darts(normal=[["sep_conv_9x9", 0]] + _DARTS_OK["normal"][1:])),
                         "unknown op 'sep_conv_9x9'"),
    "unknown_nb201_op": (_write(json.dumps({"space": "nb201", "arch": _NB201_OK.replace("avg_pool_3x3", "conv_7x7")})),
                         "unknown NB201 op 'conv_7x7'"),
    "darts_7_pairs": (_write(_darts(reduce=_DARTS_OK["reduce"][:7])), "reduce: needs 8 (op, input) pairs, got 7"),
    "nb201_5_edges": (_write("|nor_conv_3x3~0|+|nor_conv_3x3~0|skip_connect~1|+|skip_connect~0|nor_conv_3x3~1|\n"),
                      "node 3 needs 3 inputs, got 2"),
    "code_in_string": (_write("Genotype(normal=__import__('os').system('true'), normal_concat=[2], reduce=[], "
                              "reduce_concat=[2])"), "contains a call other than range(a, b); refused"),
}


def _check_one_line(proc: subprocess.CompletedProcess, path: Path, fragment: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines[:5]
    assert str(path) in lines[0], lines[0]
    assert fragment in lines[0], lines[0]
    assert len(lines[0]) < 400, lines[0]
    assert proc.stdout == ""
    return lines[0]


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_of_bad_file_is_one_line_through_sdarts_nb201(tmp_path, kind):
    make, fragment = KINDS[kind]
    path = make(tmp_path / f"{kind}.json")
    proc = run_cli(["-m", "launcher.cli", "nb201", "--genotype", str(path), "--table", str(tmp_path / "t.csv")],
                   timeout=60)
    _check_one_line(proc, path, fragment)


def test_unreadable_file_is_one_line(tmp_path):
    """Permissions: as a normal user a mode-000 file; as root (who reads anything) the CLI runs as nobody."""
    d = Path(os.environ.get("TMPDIR", "/tmp")) / f"sdarts-unreadable-{os.getpid()}"
    d.mkdir(mode=0o755, exist_ok=True)
    d.chmod(0o755)  # reachable by nobody, unlike pytest's own 0700 tmp folders
    path = d / "genotype.json"
    try:
        path.write_text(json.dumps({"space": "nb201", "arch": _NB201_OK}))
        path.chmod(0)
        args = ["-m", "launcher.cli", "nb201", "--genotype", str(path), "--table", str(tmp_path / "t.csv")]
        if os.geteuid() != 0:
            proc = run_cli(args, timeout=60)
        else:
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("running as root, and no setpriv to run the CLI as nobody (root reads any file)")
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HOME=str(d))
            proc = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", PYTHON, "-B", *args],
                                  cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
            if proc.returncode != 2 and str(path) not in proc.stderr:
                pytest.skip(f"nobody cannot run this interpreter or repo here: {proc.stderr.strip()[-200:]}")
        _check_one_line(proc, path, "cannot read the genotype file (Permission denied)")
    finally:
        path.unlink(missing_ok=True)
        d.rmdir()


def test_missing_file_names_the_literature_names(tmp_path):
    path = tmp_path / "no_such.json"
    proc = run_cli(["-m", "launcher.cli", "nb201", "--genotype", str(path), "--table", "x"], timeout=60)
    line = _check_one_line(proc, path, "genotype file not found")
    assert "darts_v2" in line and "nb201_single_darts" in line


def test_good_files_still_load(tmp_path):
    """The checks refuse bad files only: BOM-prefixed JSON, both string forms and a name still load."""
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(_DARTS_OK).encode())
    (tmp_path / "arch.txt").write_text(_NB201_OK + "\n")
    (tmp_path / "lit.txt").write_text(LITERATURE["pdarts"].to_string())
    assert load(tmp_path / "bom.json") == LITERATURE["darts_v2"]
    assert load(tmp_path / "arch.txt").to_arch_str() == _NB201_OK
    assert load(tmp_path / "lit.txt") == LITERATURE["pdarts"]
    assert load("darts_v2") == LITERATURE["darts_v2"]
    # exactly at the cap is still read
    (tmp_path / "cap.json").write_text(json.dumps(_DARTS_OK).ljust(MAX_FILE_BYTES))
    assert load(tmp_path / "cap.json") == LITERATURE["darts_v2"]


# -- the other entry points: they import torch before reading the genotype, so a few kinds each ----
_HEAVY_KINDS = ("binary", "directory", "unknown_darts_op")


def _heavy_cli(cli: str, genotype: Path, tmp_path: Path) -> tuple[list[str], Path]:
    """(arguments, the path the command would write) for one entry point."""
    out = tmp_path / "out"
    if cli == "retrain":
        return ["launcher/retrain.py", "--config", "configs/retrain/cifar10.yaml", "--genotype", str(genotype),
                "--run-dir", str(out)], out
    if cli == "export":
        return ["-m", "launcher.cli", "export", "--genotype", str(genotype), "--out", str(out)], out
    return ["-m", "launcher.cli", "summary", "--genotype", str(genotype)], out


@pytest.mark.slow
@pytest.mark.parametrize("cli,kind", [(c, k) for c in ("retrain", "export", "summary") for k in _HEAVY_KINDS[:2]]
                         + [("export", "unknown_darts_op")])
def test_bad_files_through_retrain_export_and_summary(tmp_path, cli, kind):
    make, fragment = KINDS[kind]
    path = make(tmp_path / f"{kind}.json")
    args, out = _heavy_cli(cli, path, tmp_path)
    _check_one_line(run_cli(args, timeout=300), path, fragment)
    assert not out.exists()  # nothing half-written: no run directory, no export folder
