"""NAS-Bench-201 scoring: table lookups against the benchmark's known rows, the `sdarts nb201` command,
and per-epoch scoring inside a search."""
from __future__ import annotations

import json

import pytest

from conftest import ROOT, need_data, run_cli
from sdarts import genotype as G
from sdarts.errors import GenotypeError, TableError
from sdarts.nasbench201 import table as B

SINGLE_DARTS = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|"
ALL_SKIP = "|skip_connect~0|+|skip_connect~0|skip_connect~1|+|skip_connect~0|skip_connect~1|skip_connect~2|"


@pytest.fixture(scope="module")
def table() -> str:
    return str(need_data("nb201", "nb201_accuracies.csv.gz"))


def test_optimum_is_index_6111(table):
    arch, val = B.best("cifar10_valid_val", table)
    g = G.NB201Genotype.from_arch_str(arch)
    acc = B.lookup(g, table)
    assert B.index_of(g, table) == 6111
    assert val == pytest.approx(91.6067, abs=1e-3)
    assert acc["cifar10_test"] == pytest.approx(94.3733, abs=1e-3)
    # and it is the CIFAR-10 test optimum too
    assert B.best("cifar10_test", table)[0] == arch


def test_single_darts_cell_index_9930(table):
    g = G.NB201Genotype.from_arch_str(SINGLE_DARTS)
    acc = B.lookup(g, table)
    assert B.index_of(g, table) == 9930
    expected = {"cifar10_valid_val": 91.55, "cifar10_test": 94.36, "cifar100_val": 73.49, "cifar100_test": 73.51,
                "imagenet16_val": 46.37, "imagenet16_test": 46.34}  # the paper's Table 1, Single-DARTS row
    assert set(acc) == set(B.COLUMNS)
    for k, v in expected.items():
        assert acc[k] == pytest.approx(v, abs=0.006), k


def test_all_skip_cell_is_darts_collapse(table):
    acc = B.lookup(G.NB201Genotype.from_arch_str(ALL_SKIP), table)
    # the paper's Table 1 DARTS row
    assert acc["cifar10_valid_val"] == pytest.approx(39.77, abs=0.006)
    assert acc["cifar10_test"] == pytest.approx(54.30, abs=0.006)
    assert acc["cifar100_val"] == pytest.approx(15.03, abs=0.006)
    assert acc["imagenet16_test"] == pytest.approx(16.32, abs=0.006)


def test_lookup_refuses_darts_genotype(table):
    with pytest.raises(GenotypeError):
        B.lookup(G.load("darts_v2"), table)


def test_bad_table_is_one_clear_error(tmp_path):
    with pytest.raises(TableError, match="not found"):
        B.load_table(str(tmp_path / "missing.csv.gz"))
    bad = tmp_path / "bad.csv"
    bad.write_text("arch,foo\nx,1\n")
    with pytest.raises(TableError, match="missing column 'cifar10_valid_val'"):
        B.load_table(str(bad))


def test_cli_prints_six_accuracies(table, tmp_path):
    gpath = tmp_path / "g.json"
    G.save(G.NB201Genotype.from_arch_str(SINGLE_DARTS), gpath)
    r = run_cli(["launcher/cli.py", "nb201", "--genotype", str(gpath), "--table", table])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["arch"] == SINGLE_DARTS and out["nb201_index"] == 9930
    assert out["cifar10_test"] == pytest.approx(94.36, abs=0.006)
    assert all(c in out for c in B.COLUMNS)
    # a literature name and an inline arch string work too
    r = run_cli(["launcher/cli.py", "nb201", "--genotype", ALL_SKIP, "--table", table])
    assert json.loads(r.stdout.strip().splitlines()[-1])["cifar10_test"] == pytest.approx(54.30, abs=0.006)


def test_cli_lookup_imports_neither_torch_nor_deepspeed(table):
    """A table lookup is a CSV read: it answered in ~5 s (torch, DeepSpeed and DeepSpeed's accelerator
    warning on stderr) before genotypes, op names and the CLI's error plumbing stopped importing them."""
    probe = ("import json, sys; from launcher.cli import main; rc = main(sys.argv[1:]); "
             "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules, 'deepspeed': 'deepspeed' in sys.modules}))")
    r = run_cli(["-c", probe, "nb201", "--genotype", SINGLE_DARTS, "--table", table])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert json.loads(lines[0])["nb201_index"] == 9930
    assert json.loads(lines[-1]) == {"rc": 0, "torch": False, "deepspeed": False}
    assert r.stderr == ""


@pytest.mark.parametrize("genotype,table_name,needle", [
    ("nope.json", None, "genotype file not found"),
    ("darts_v2", None, "no NAS-Bench-201 entry"),
    ("nb201_all_skip", "missing.csv.gz", "NB201 table not found"),
])
def test_cli_bad_input_exit_2(table, tmp_path, genotype, table_name, needle):
    t = str(tmp_path / table_name) if table_name else table
    r = run_cli(["launcher/cli.py", "nb201", "--genotype", genotype, "--table", t])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error:") and needle in r.stderr


def test_search_scores_every_epoch(table, tmp_path):
    """A search that names a table logs each epoch's cell with its six accuracies, and the summary the final."""
    run = tmp_path / "run"
    r = run_cli(["launcher/search.py", "--config", str(ROOT / "configs/search/smoke.yaml"), "--run-dir", str(run),
                 "--set", f"nb201_table={table}", "--set", "log.tensorboard=false", "--set", "log.progress=false"])
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(l) for l in (run / "nb201_scores.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2]
    for l in lines:
        g = G.load(run / "genotypes" / f"epoch_{l['epoch']:03d}.json")
        assert l["arch"] == g.to_arch_str()
        assert {c: l[c] for c in B.COLUMNS} == B.lookup(g, table)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["nb201"] == B.lookup(G.load(run / "genotype.json"), table)
