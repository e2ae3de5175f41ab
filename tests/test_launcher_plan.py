"""The planner: memory model, GPU profiles, calibration table and the plans for the paper's cases."""
import json
import shlex

import pytest
import yaml

from conftest import ROOT, run_cli
from launcher import gpus, hostfile, memory as M, plan as P
from launcher.job import load as load_job
from sdarts.errors import ConfigError, PlanError

SEARCH = "configs/search/darts_imagenet.yaml"
RETRAIN = "configs/retrain/imagenet.yaml"


def _plan(job, hosts, gpu, **kw):
    return P.make_plan(load_job(job, kw.pop("overrides", None)), hostfile.parse(hosts, "hf"), gpus.load(gpu),
                       M.load_table(), **kw)



@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    """Job and hostfile paths in these tests are relative to the repository root, as a user types them."""
    monkeypatch.chdir(ROOT)

# -- memory model ----------------------------------------------------------------------------------
def test_least_squares_fit_and_max_micro_batch():
    m = M.fit([(2, 1000 + 2 * 300), (4, 1000 + 4 * 300), (8, 1000 + 8 * 300)])
    assert (m.fixed_bytes, m.per_sample_bytes) == (1000, 300)
    noisy = M.fit([(2, 1610), (4, 2190), (8, 3420)])  # slope 301.4..., intercept ~998
    assert noisy.per_sample_bytes == 302 and abs(noisy.fixed_bytes - 998) < 10
    assert m.max_micro_batch(1000 + 300 * 7 + 299) == 7 and m.max_micro_batch(900) == 0
    with pytest.raises(ValueError, match="two or more"):
        M.fit([(4, 10), (4, 12)])
    with pytest.raises(ValueError, match="does not grow"):
        M.fit([(2, 500), (4, 400)])


def test_counted_activations_halve_at_16_bit():
    job = load_job("configs/search/smoke.yaml")
    from launcher.memory_probe import count_saved_bytes
    f32 = count_saved_bytes(job, 4, "fp32") - count_saved_bytes(job, 2, "fp32")
    b16 = count_saved_bytes(job, 4, "bf16") - count_saved_bytes(job, 2, "bf16")
    assert f32 > 0 and 0.4 < b16 / f32 < 0.75, (f32, b16)


# -- profiles and calibration ----------------------------------------------------------------------
def test_gpu_profiles():
    assert gpus.names() == ["2080ti", "a100-40gb", "a100-80gb", "cpu", "h100-80gb", "h200", "v100-16gb", "v100-32gb"]
    for name in gpus.names():
        p = gpus.load(name)
        assert p.name == name and "fp32" in p.precisions and p.memory_bytes() > 0
    ti = gpus.load("2080ti")
    assert ti.precisions == ["fp32", "fp16"] and ti.memory_mib == 11019
    assert ti.pick_precision("bf16") == "fp16" and ti.pick_precision("fp32") == "fp32"
    assert gpus.load("h100-80gb").pick_precision("bf16") == "bf16"
    assert gpus.load("cpu").pick_precision("fp16") == "bf16"
    with pytest.raises(ConfigError, match="unknown GPU profile 'k80'.*2080ti"):
        gpus.load("k80")


def test_calibration_table_covers_the_shipped_configs():
    table = M.load_table()
    for cfg in sorted((ROOT / "configs" / "search").glob("*.yaml")) + sorted((ROOT / "configs" / "retrain").glob("*.yaml")):
        job = load_job(cfg.relative_to(ROOT))
        cal = table.jobs.get(job.name)
        assert cal is not None, f"no calibration for {job.name}"
        assert M.reference_global_batch(table, job), job.name
        assert cal.shape == job.shape(), job.name
        cpu = cal.memory["cpu"]["fp32"]
        assert cpu.source == "measured" and len(cpu.points) >= 3, job.name
        for prec in ("fp32", "bf16", "fp16"):
            g = cal.memory["gpu"][prec]
            assert g.source == "derived" and g.per_sample_bytes > 0 and g.how, (job.name, prec)
        # 16-bit activations are about half of fp32 ones
        assert 0.4 < cal.memory["gpu"]["fp16"].per_sample_bytes / cal.memory["gpu"]["fp32"].per_sample_bytes < 0.75


# -- the paper's cases -----------------------------------------------------------------------------
def test_search_on_4_2080ti_is_the_papers_batch_360():
    for keep in (False, True):
        p = _plan(SEARCH, "gpu-node01 slots=4\n", "2080ti", keep_global_batch=keep)
        assert (p["world_size"], p["micro_batch"], p["grad_accum"], p["global_batch"]) == (4, 90, 1, 360)
        assert p["lr"] == 0.025 and p["precision"] == "fp16"  # the config's bf16 does not exist on Turing
        assert p["memory"]["max_micro_batch"] >= 90
        assert p["overrides"] == ["data.micro_batch=90", "engine.grad_accum=1", "optim.w.lr=0.025", "precision=fp16"]


def test_retrain_on_8_2080ti_is_the_papers_768():
    """ImageNet retrain on one node of 8 x 2080 Ti: fp16 (the config's bf16 does not exist on Turing),
    planned from the paper's own report for that GPU (source `published`, gpu_profiles.2080ti.fp16):
    96 a GPU, 768 / 0.375."""
    p = _plan(RETRAIN, "gpu-node01 slots=8\n", "2080ti")
    assert (p["world_size"], p["precision"]) == (8, "fp16")
    assert (p["micro_batch"], p["grad_accum"], p["global_batch"], p["lr"]) == (96, 1, 768, 0.375)
    assert p["memory_source"].startswith("published (gpu_profiles.2080ti.fp16): Single-DARTS paper")
    assert p["memory"]["calibration"] == "published" and 96 <= p["memory"]["max_micro_batch"] < 104
    assert "6.6M params" in p["memory"]["calibration_genotype"]
    assert p["overrides"][-1] == "optim.w.reference_batch=768"  # the retrain script must not rescale
    assert any("published calibration" in n for n in p["notes"])
    keep = _plan(RETRAIN, "gpu-node01 slots=8\n", "2080ti", keep_global_batch=True)
    assert (keep["micro_batch"], keep["grad_accum"], keep["global_batch"], keep["lr"]) == (64, 2, 1024, 0.5)


def test_published_entry_lies_in_the_papers_bracket():
    """The published per-sample bytes: 96 fit and 128 do not under the planner's own budget, and the
    largest multiple of 8 that fits is 96 (so the plan is the paper's)."""
    e = M.load_table().jobs["retrain/imagenet"].gpu_profiles["2080ti"]["fp16"][0]
    assert e.source == "published" and not e.points and "768/0.375" in e.how
    budget = gpus.load("2080ti").usable_bytes(P.DEFAULT_MARGIN)
    lo, hi = M.per_sample_bracket(budget, e.fixed_bytes, fits=96, does_not_fit=128)
    lo8, _ = M.per_sample_bracket(budget, e.fixed_bytes, fits=96, does_not_fit=104)
    assert lo < lo8 < e.per_sample_bytes <= hi
    assert e.model().bytes_at(96) <= budget < e.model().bytes_at(128)


def test_derived_darts_v2_entry_alone_would_allow_128(tmp_path):
    """Without the paper's report the generic derived entry (DARTS_V2 cell, counted activations) says
    the reference 128 a GPU fits in fp16 on 11 GB: 1024 / 0.5. This is why the published entry exists."""
    table = yaml.safe_load((ROOT / "configs" / "calibration.yaml").read_text())
    del table["jobs"]["retrain/imagenet"]["gpu_profiles"]
    path = tmp_path / "cal.yaml"
    path.write_text(yaml.safe_dump(table))
    p = P.make_plan(load_job(RETRAIN), hostfile.parse("n slots=8\n"), gpus.load("2080ti"), M.load_table(path))
    assert (p["micro_batch"], p["grad_accum"], p["global_batch"], p["lr"], p["precision"]) == (128, 1, 1024, 0.5, "fp16")
    assert p["memory"]["max_micro_batch"] >= 128 and p["memory_source"].startswith("derived (memory.gpu.fp16)")
    assert p["memory"]["calibration_genotype"] == "darts_v2"


def test_profile_entries_lookup_order(tmp_path):
    """measured for the profile > published for the profile > generic memory.gpu; other profiles and
    precisions are untouched by a profile entry; a derived entry under gpu_profiles is refused."""
    table = yaml.safe_load((ROOT / "configs" / "calibration.yaml").read_text())
    job = table["jobs"]["retrain/imagenet"]
    published = job["gpu_profiles"]["2080ti"]["fp16"][0]
    measured = dict(published, source="measured", where="RTX 2080 Ti (torch x)", how="plan.py --probe",
                    per_sample_bytes=published["per_sample_bytes"] // 2, points=[[8, 1], [16, 2]])
    del measured["genotype"]
    job["gpu_profiles"]["2080ti"]["fp16"].append(measured)  # listed after the published one: still wins
    path = tmp_path / "cal.yaml"
    path.write_text(yaml.safe_dump(table))
    t, job_ = M.load_table(path), load_job(RETRAIN)
    model, entry, key = M.lookup(t, job_, "gpu", "fp16", path, profile="2080ti")
    assert (entry.source, key, model.per_sample_bytes) == ("measured", "gpu_profiles.2080ti.fp16",
                                                           published["per_sample_bytes"] // 2)
    _, entry, key = M.lookup(t, job_, "gpu", "fp32", path, profile="2080ti")
    assert (entry.source, key) == ("derived", "memory.gpu.fp32")
    _, entry, key = M.lookup(t, job_, "gpu", "fp16", path, profile="v100-16gb")
    assert (entry.source, key) == ("derived", "memory.gpu.fp16")

    job["gpu_profiles"]["2080ti"]["fp16"][0]["source"] = "derived"
    path.write_text(yaml.safe_dump(table))
    with pytest.raises(ConfigError, match="gpu_profiles.2080ti.fp16: source 'derived' belongs under memory.gpu"):
        M.load_table(path)


def test_probe_snippet_files_a_gpu_measurement_under_its_profile():
    """`--probe --gpu 2080ti` on a GPU prints its measured entry under gpu_profiles.2080ti, which the
    table accepts and the planner then prefers over the published one."""
    job = load_job(RETRAIN)
    e = M.MemoryEntry(fixed_bytes=1 << 30, per_sample_bytes=80 << 20, source="measured", where="RTX 2080 Ti",
                      when="2026-01-01", how="plan.py --probe", points=[(32, 1), (64, 2)])
    doc = yaml.safe_load(M.snippet(job, {}, "darts_v2", None, {"2080ti": {"fp16": e}}))
    body = doc["jobs"]["retrain/imagenet"]
    assert body["memory"] == {} and body["gpu_profiles"]["2080ti"]["fp16"][0]["points"] == [[32, 1], [64, 2]]
    table = yaml.safe_load((ROOT / "configs" / "calibration.yaml").read_text())
    table["jobs"]["retrain/imagenet"]["gpu_profiles"]["2080ti"]["fp16"] += body["gpu_profiles"]["2080ti"]["fp16"]
    _, entry, _ = M.lookup(M.CalibrationTable.model_validate(table), job, "gpu", "fp16", profile="2080ti")
    assert entry == e


def test_other_gpus_keep_the_derived_plan():
    for gpu, prec in (("a100-40gb", "bf16"), ("a100-80gb", "bf16"), ("h100-80gb", "bf16"), ("v100-16gb", "fp16")):
        p = _plan(RETRAIN, "n slots=8\n", gpu)
        assert (p["micro_batch"], p["global_batch"], p["lr"], p["precision"]) == (128, 1024, 0.5, prec), gpu
        assert p["memory"]["calibration"] == "derived" and p["memory_source"].startswith("derived"), gpu


def test_memory_bound_plans_round_down_and_scale_lr():
    """4 x 2080 Ti in fp32 cannot hold the reference 256 a GPU: the largest multiple of 8 that fits,
    and the lr scaled linearly from 1024 / 0.5."""
    p = _plan(RETRAIN, "gpu-node01 slots=4\n", "2080ti", precision="fp32")
    mb, fit = p["micro_batch"], p["memory"]["max_micro_batch"]
    assert p["precision"] == "fp32" and mb < 256 and mb % 8 == 0 and mb <= fit < mb + 8
    assert p["global_batch"] == 4 * mb and p["lr"] == pytest.approx(0.5 * 4 * mb / 1024, rel=1e-5)
    assert f"optim.w.reference_batch={4 * mb}" in p["overrides"]
    assert p["memory"]["step_mib"] <= p["memory"]["budget_mib"]


def test_lr_scales_with_world_size_and_keep_needs_divisibility():
    p = _plan(SEARCH, "a slots=4\nb slots=4\nc slots=4\nd slots=4\n", "2080ti")
    assert (p["micro_batch"], p["global_batch"]) == (22, 352)
    assert p["lr"] == pytest.approx(0.025 * 352 / 360, rel=1e-5)
    with pytest.raises(PlanError, match="360 is not divisible by the world size 16"):
        _plan(SEARCH, "a slots=4\nb slots=4\nc slots=4\nd slots=4\n", "2080ti", keep_global_batch=True)
    big = _plan(SEARCH, "a slots=1\n", "h200", keep_global_batch=True)
    assert (big["micro_batch"], big["grad_accum"], big["precision"]) == (360, 1, "bf16")
    small = _plan(SEARCH, "a slots=1\n", "2080ti", keep_global_batch=True)  # 360 on one 11 GB card
    assert small["micro_batch"] * small["grad_accum"] == 360 and small["grad_accum"] > 1
    assert small["micro_batch"] <= small["memory"]["max_micro_batch"] and small["lr"] == 0.025


def test_calibration_errors_are_one_line():
    with pytest.raises(ConfigError, match=r"made with model\.C=16, the job has model\.C=32; run `python launcher/plan.py --probe"):
        _plan(SEARCH, "a slots=4\n", "2080ti", overrides=["model.C=32"])
    tiny = gpus.GpuProfile(name="tiny", memory_mib=64, precisions=["fp32", "fp16"])
    with pytest.raises(PlanError, match="needs .* MiB for one sample; tiny offers"):
        P.make_plan(load_job(SEARCH), hostfile.parse("a slots=1\n"), tiny, M.load_table())


def _cli(capsys, *args):
    """`launcher/plan.py ARGS` in this process: (exit code, stdout, stderr)."""
    try:
        code = P.main(list(args))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_json_and_exact_command(tmp_path, capsys):
    hf = tmp_path / "hosts"
    hf.write_text("gpu-node01 slots=4\n")
    code, out, err = _cli(capsys, "--job", SEARCH, "--hostfile", str(hf), "--gpu", "2080ti",
                          "--set", "data.root=/data/imagenet")
    assert code == 0, err
    p = json.loads(out)
    assert p["command"] == shlex.join(p["argv"])
    assert p["argv"] == ["deepspeed", "--hostfile", str(hf), "launcher/search.py", "--config", SEARCH,
                         "--set", "data.root=/data/imagenet", "--set", "data.micro_batch=90",
                         "--set", "engine.grad_accum=1", "--set", "optim.w.lr=0.025", "--set", "precision=fp16"]

    other = tmp_path / "other.yaml"
    other.write_text((ROOT / "configs/search/smoke.yaml").read_text())
    code, out, err = _cli(capsys, "--job", str(other), "--hostfile", str(hf), "--gpu", "2080ti")
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "no calibration for job 'search/other'" in err


def test_retrain_command_passes_the_genotype_and_sets_reference_batch(capsys):
    code, out, err = _cli(capsys, "--job", RETRAIN, "--hostfile", "hostfiles/2080ti-1node-8gpu", "--gpu", "2080ti",
                          "--", "--genotype", "darts_v2", "--run-dir", "runs/x")
    assert code == 0, err
    p = json.loads(out)
    assert p["argv"][3:6] == ["launcher/retrain.py", "--config", RETRAIN]
    assert p["argv"][-4:] == ["--genotype", "darts_v2", "--run-dir", "runs/x"]
    assert "optim.w.reference_batch=768" in p["argv"] and p["memory_source"].startswith("published")
    # the published 2080 Ti entry was seen with the paper's cell, not darts_v2: the plan says so
    assert "note: memory calibrated with genotype the paper's ImageNet cell" in err and "published calibration" in err

    code, out, err = _cli(capsys, "--job", RETRAIN, "--hostfile", "hostfiles/2080ti-1node-8gpu", "--gpu", "a100-40gb",
                          "--", "--genotype", "darts_v2")
    assert code == 0 and "genotype" not in err and "derived (not measured)" in err  # calibrated with darts_v2 itself
    code, out, err = _cli(capsys, "--job", RETRAIN, "--hostfile", "hostfiles/2080ti-1node-8gpu", "--gpu", "a100-40gb",
                          "--", "--genotype", "pdarts")
    assert code == 0 and "note: memory calibrated with genotype darts_v2" in err and "--genotype pdarts" in err


@pytest.mark.slow
def test_run_executes_the_plan_on_localhost(tmp_path):
    run = tmp_path / "run"
    r = run_cli(["launcher/plan.py", "--job", "configs/search/smoke.yaml", "--hostfile", "hostfiles/localhost",
                 "--gpu", "cpu", "--set", "log.progress=false", "--run", "--", "--run-dir", str(run)], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    plan = json.loads(r.stdout[:r.stdout.index("\n}\n") + 2])
    assert plan["argv"][:5] == ["deepspeed", "--hostfile", "hostfiles/localhost", "--no_ssh_check",
                                "--master_addr=127.0.0.1"]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["micro_batch"] == plan["micro_batch"] and cfg["optim"]["w"]["lr"] == plan["lr"]
    assert json.loads((run / "summary.json").read_text())["world_size"] == 1


@pytest.mark.slow
def test_probe_prints_a_pasteable_measured_entry():
    r = run_cli(["launcher/plan.py", "--probe", "--job", "configs/search/smoke.yaml", "--probe-batches", "4,64",
                 "--probe-steps", "1"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = yaml.safe_load(r.stdout)
    entry = doc["jobs"]["search/smoke"]
    assert entry["shape"] == load_job("configs/search/smoke.yaml").shape()
    e = M.MemoryEntry.model_validate(entry["memory"]["cpu"]["fp32"])
    assert e.source == "measured" and [b for b, _ in e.points] == [4, 64]
    assert e.points[1][1] > e.points[0][1] and e.per_sample_bytes > 0 and "peak RSS" in e.how
