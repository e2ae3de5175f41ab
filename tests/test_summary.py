"""`sdarts summary`: the published parameter counts and FLOPs of literature cells, and --fit-flops."""
import json

import pytest

from conftest import run_cli
from retrain.summary import count_flops, fit_flops, parse_count, summarize
from retrain.model import NetworkImageNet
from sdarts.genotype import parse
from sdarts.genotype import LITERATURE

# name, dataset, published params (M), reference-implementation MACs (M), papers' printed FLOPs (M)
PUBLISHED = [
    ("darts_v2", "imagenet", 4.7, 530, None),   # DARTS prints 574M: not reproducible by a known counter
    ("pdarts", "imagenet", 4.9, 543, 557),
    ("pc_darts_imagenet", "imagenet", 5.3, 582, 597),
    ("darts_v2", "cifar10", 3.3, None, None),
]


@pytest.mark.parametrize("name,dataset,params_m,flops_m,paper_m", PUBLISHED)
def test_published_figures(name, dataset, params_m, flops_m, paper_m):
    s = summarize(LITERATURE[name], dataset)
    assert (s["layers"], s["channels"]) == ((14, 48) if dataset == "imagenet" else (20, 36))
    assert abs(s["params"] / 1e6 - params_m) <= 0.05, s["params"]
    if flops_m:
        assert abs(s["flops"] / 1e6 - flops_m) <= 0.01 * flops_m, s["flops"]
    if paper_m:  # the thop-style column reproduces the papers' printed numbers
        assert round(s["flops_thop"] / 1e6) == paper_m, s["flops_thop"]


def test_params_exclude_the_auxiliary_head():
    g = LITERATURE["darts_v2"]
    s = summarize(g, "imagenet")
    with_aux = NetworkImageNet(48, 1000, 14, True, g)
    without = NetworkImageNet(48, 1000, 14, False, g)
    assert s["params"] == sum(p.numel() for p in without.parameters())
    assert s["params"] + s["params_aux"] == sum(p.numel() for p in with_aux.parameters())
    assert count_flops(with_aux, 224) == s["flops"]  # the aux head does not run in eval


def test_nb201_network_matches_the_benchmark_extremes():
    # NAS-Bench-201's CIFAR-10 networks span 0.073M / 7.8M FLOPs (all none) to 1.53M / 220M (all 3x3)
    big = summarize(parse("|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|"), "cifar10")
    small = summarize(parse("|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"), "cifar10")
    assert round(big["params"] / 1e6, 2) == 1.53 and round(big["flops"] / 1e6) == 220
    assert round(small["params"] / 1e6, 3) == 0.073 and round(small["flops"] / 1e6, 1) == 7.8


def test_fit_flops_is_the_largest_channel_count_under_the_budget():
    g = LITERATURE["darts_v2"]
    c = fit_flops(g, 600_000_000)
    assert c % 2 == 0
    assert summarize(g, channels=c)["flops"] <= 600_000_000 < summarize(g, channels=c + 2)["flops"]
    with pytest.raises(ValueError, match="below the smallest"):
        fit_flops(g, 1000)


def test_parse_count():
    assert parse_count("600M") == 600_000_000 and parse_count("0.6G") == 600_000_000
    assert parse_count("1234") == 1234
    with pytest.raises(ValueError, match="600M"):
        parse_count("six hundred")


def test_cli_prints_json():
    r = run_cli(["launcher/cli.py", "summary", "--genotype", "darts_v2", "--dataset", "cifar10",
                 "--layers", "8", "--channels", "16"])
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert isinstance(out["params"], int) and isinstance(out["flops"], int)
    assert (out["layers"], out["channels"], out["resolution"]) == (8, 16, 32)


def test_cli_fit_flops_and_bad_input(capsys):
    from launcher.cli import main
    assert main(["summary", "--genotype", "darts_v2", "--fit-flops", "600M"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["flops"] <= 600_000_000 and out["fit_flops_budget"] == 600_000_000
    for bad, msg in ((["--genotype", "no_such_cell"], "genotype file not found"),
                     (["--genotype", "darts_v2", "--channels", "15"], "even"),
                     (["--genotype", "darts_v2", "--fit-flops", "lots"], "FLOPs budget"),
                     (["--genotype", "nb201_single_darts", "--dataset", "imagenet"], "cifar10")):
        with pytest.raises(SystemExit) as e:
            main(["summary", *bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err[-1].startswith("error:") and msg in err[-1], err
