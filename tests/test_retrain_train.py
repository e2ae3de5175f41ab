"""The retrain loop on real CIFAR-10 / ImageNet images with a real DeepSpeed engine (CPU, gloo)."""
import json
import os
import subprocess

import pytest
import torch

from conftest import PYTHON, ROOT, deepspeed_cmd, need_data
from retrain.config import RetrainConfig, load
from retrain.model import NetworkCIFAR, NetworkImageNet
from retrain.evaluate import evaluate
from retrain.train import build_engine, run_retrain, train_loss
from sdarts.config import build
from sdarts.distributed import init
from sdarts.genotype import LITERATURE

DARTS_V2 = LITERATURE["darts_v2"]


def tiny(root, **over) -> RetrainConfig:
    """A seconds-long CIFAR retrain: 3 cells of 4 channels, 90 train images less the default holdout of 1
    per class = 80 (5 steps an epoch), 90 test images."""
    tree = {"epochs": 2, "model": {"C": 4, "layers": 3, "auxiliary": True, "drop_path": 0.2},
            "optim": {"w": {"lr": 0.05}}, "loss": {"label_smoothing": 0.1}, "ema": {"decay": 0.9},
            "data": {"root": str(root), "micro_batch": 16, "max_per_split": 90, "cutout": 16},
            "log": {"progress": False, "tensorboard": False, "every_steps": 1}}
    return build(RetrainConfig, tree, [f"{k}={v}" for k, v in over.items()])


def _last_weights(run) -> dict:
    tag = (run / "checkpoints" / "latest").read_text().strip()
    return torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)


def test_a_few_real_steps_lower_the_loss():
    npz = need_data("cifar10-subset", "cifar10_subset.npz")
    import numpy as np
    from sdarts.data.constants import CIFAR_MEAN, CIFAR_STD
    d = np.load(npz)
    x = torch.from_numpy(d["x_train"][:64]).permute(0, 3, 1, 2).float()
    x = (x - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1) * 255) / (torch.tensor(CIFAR_STD).view(1, 3, 1, 1) * 255)
    y = torch.from_numpy(d["y_train"][:64].astype("int64"))
    cfg = tiny(npz, **{"data.micro_batch": 64, "model.C": 8})
    _, _, world, _ = init("cpu")
    torch.manual_seed(0)
    ds_engine, opt, ds = build_engine(cfg, NetworkCIFAR(8, 10, 3, True, DARTS_V2), world)
    assert ds["gradient_clipping"] == 5.0 and isinstance(opt, torch.optim.SGD)
    losses = []
    for _ in range(8):
        logits, aux = ds_engine(x)
        loss = train_loss(cfg, logits, aux, y)
        ds_engine.backward(loss)
        ds_engine.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_resume_after_a_step_cap_is_bit_exact(tmp_path):
    npz = need_data("cifar10-subset", "cifar10_subset.npz")
    ref, run = tmp_path / "ref", tmp_path / "run"
    full = run_retrain(tiny(npz), DARTS_V2, ref)
    assert full.finished and full.summary["steps"] == 10
    part = run_retrain(tiny(npz, max_steps=7), DARTS_V2, run)  # stops mid-epoch 2 (5 steps an epoch)
    assert not part.finished and part.summary["steps"] == 7 and not (run / "summary.json").exists()
    done = run_retrain(tiny(npz), DARTS_V2, run, resume=True)
    assert done.finished and done.summary["steps"] == 10
    a, b = _last_weights(ref), _last_weights(run)
    for k in a["module"]:
        assert torch.equal(a["module"][k], b["module"][k]), k
    for k in a["ema"]["state"]:
        assert torch.equal(a["ema"]["state"][k], b["ema"]["state"][k]), k
    assert a["selected"] == b["selected"] and a["last_eval"] == b["last_eval"]
    lines = lambda p: [json.loads(l) for l in (p / "metrics.jsonl").read_text().splitlines()]
    strip = lambda recs: [{k: v for k, v in r.items() if k != "images_per_s"} for r in recs]
    assert strip(lines(ref)) == strip(lines(run))
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert best["selected"]["source"] == "ema" and best["genotype"] == DARTS_V2.to_json()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["last"]["eval"]["images"] == 90  # every test image counted once
    assert summary["last"]["holdout"]["images"] == 10 and summary["holdout_per_class"] == 1
    assert summary["selected"] == best["selected"] and summary["selected"]["on"] == "holdout"


def test_bf16_runs_with_batchnorm_in_fp32(tmp_path):
    npz = need_data("cifar10-subset", "cifar10_subset.npz")
    res = run_retrain(tiny(npz, precision="bf16", max_steps=2, **{"ema.decay": 0.0}), DARTS_V2, tmp_path / "bf16")
    assert res.summary["steps"] == 2
    ds = json.loads((tmp_path / "bf16" / "ds_config.json").read_text())
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in ds
    weights = _last_weights(tmp_path / "bf16")["module"]
    assert all(v.dtype == torch.float32 for k, v in weights.items() if "running" in k or "weight" in k)


def test_fp16_runs_or_is_refused_in_one_line(tmp_path, capsys):
    from launcher.retrain import main
    npz = need_data("cifar10-subset", "cifar10_subset.npz")
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    args = ["--config", "configs/retrain/cifar10.yaml", "--genotype", "darts_v2", "--run-dir", str(tmp_path / "f"),
            "--set", "precision=fp16", "--set", "max_steps=1", "--set", f"data.root={npz}",
            "--set", "data.max_per_split=40", "--set", "model.layers=3", "--set", "model.C=4",
            "--set", "data.micro_batch=16", "--set", "log.progress=false"]
    if "avx512_fp16" in flags or "amx_fp16" in flags:
        assert main(args) == 0
        ds = json.loads((tmp_path / "f" / "ds_config.json").read_text())
        assert ds["torch_autocast"]["dtype"] == "float16"
    else:
        with pytest.raises(SystemExit) as e:
            main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err[-1] == ("error: precision fp16: this CPU has no fp16 arithmetic "
                                                 "(avx512_fp16); use fp32 or bf16")
        assert not (tmp_path / "f").exists()  # nothing half-written


def test_cli_refuses_clobbering_and_foreign_checkpoints(tmp_path, capsys):
    from launcher.retrain import main
    npz = need_data("cifar10-subset", "cifar10_subset.npz")
    run = tmp_path / "r"
    args = ["--config", "configs/retrain/cifar10.yaml", "--run-dir", str(run), "--set", f"data.root={npz}",
            "--set", "max_steps=1", "--set", "data.max_per_split=40", "--set", "model.layers=3",
            "--set", "model.C=4", "--set", "data.micro_batch=16", "--set", "log.progress=false"]
    assert main([*args, "--genotype", "darts_v2"]) == 0
    capsys.readouterr()
    for extra, msg in ((["--genotype", "darts_v2"], "pass --resume"),
                       (["--genotype", "pdarts", "--resume"], "another genotype"),
                       (["--genotype", "darts_v2", "--set", "optim.w.lr=-1"], "optim.w.lr")):
        with pytest.raises(SystemExit) as e:
            main([*args, *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err[-1].startswith("error:") and msg in err[-1], err


@pytest.mark.slow
def test_imagenet_network_on_real_imagenet_images():
    root = need_data("imagenet-sample")
    cfg = load(ROOT / "configs/retrain/imagenet.yaml",
               [f"data.root={root}", f"data.classes_file={root / 'classes.tsv'}", "data.backend=torch",
                "data.micro_batch=8", "data.workers=1", "precision=fp32", "model.C=8", "model.layers=3"])
    from retrain.data import build_loaders
    _, _, world, device = init("cpu")
    loaders = build_loaders(cfg, 0, 1, device)
    train, val = loaders.train, loaders.eval
    assert loaders.holdout is None  # one image per class in the sample: no class can spare one
    batch = next(iter(train))
    assert batch.x.shape == (8, 3, 224, 224) and int(batch.y.max()) < 1000
    torch.manual_seed(0)
    net = NetworkImageNet(8, 1000, 3, True, DARTS_V2).train()
    logits, aux = net(batch.x)
    loss = train_loss(cfg, logits, aux, batch.y)
    assert torch.isfinite(loss) and loss.item() > 6.0  # ~ln(1000) at init, plus 0.4 x aux
    loss.backward()
    ev = evaluate(net, val, cfg, device)
    assert ev["images"] == 100 and 0.0 <= ev["top1"] <= ev["top5"] <= 100.0


@pytest.mark.slow
def test_two_ranks_end_to_end(tmp_path):
    wds = need_data("cifar10-wds")
    run = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([deepspeed_cmd(), "--num_gpus", "2", "--master_port", "29651", "launcher/retrain.py",
                        "--config", "configs/retrain/cifar10.yaml", "--genotype", "darts_v2", "--run-dir", str(run),
                        "--set", "epochs=1", "--set", "model.layers=3", "--set", "model.C=8",
                        "--set", f"data.root={wds}", "--set", "data.max_per_split=200", "--set", "data.micro_batch=16",
                        "--set", "log.progress=false", "--set", "log.every_steps=2"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ("config.yaml", "ds_config.json", "genotype.json", "metrics.jsonl", "summary.json",
              "checkpoints/latest", "checkpoints/best.pt"):
        assert (run / f).exists(), f
    assert any(f.name.startswith("events.out.tfevents") for f in (run / "tb").iterdir())
    s = json.loads((run / "summary.json").read_text())
    assert s["world_size"] == 2 and s["global_batch"] == 32 and s["lr"] == 0.025 * 32 / 128
    # 20 per class, 2 held out: 180 train images; both ranks' shards, no repeats, in each evaluation
    assert s["steps"] == 180 // 32 and s["last"]["eval"]["images"] == 200 and s["last"]["holdout"]["images"] == 20
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    net = NetworkCIFAR(8, 10, 3, True, DARTS_V2)
    net.load_state_dict(best["module"])


@pytest.mark.slow
def test_sigterm_checkpoints_exits_124_and_resumes(tmp_path):
    import signal
    import time
    npz = need_data("cifar10-subset", "cifar10_subset.npz")
    run = tmp_path / "pre"
    args = ["launcher/retrain.py", "--config", "configs/retrain/cifar10.yaml", "--genotype", "darts_v2",
            "--run-dir", str(run), "--set", f"data.root={npz}", "--set", "epochs=2", "--set", "model.layers=3",
            "--set", "model.C=4", "--set", "data.max_per_split=320", "--set", "data.micro_batch=16",
            "--set", "log.progress=false", "--set", "log.every_steps=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.Popen([PYTHON, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 2:
            p.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 124, err[-2000:]
    assert (run / "checkpoints" / "latest").exists() and not (run / "summary.json").exists()
    stopped = int((run / "checkpoints" / "latest").read_text().strip().removeprefix("step"))
    total = 2 * ((320 - 10 * 3) // 16)  # 32 per class less the default holdout of 3: 18 steps an epoch
    assert 2 <= stopped < total
    r = subprocess.run([PYTHON, *args, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((run / "summary.json").read_text())
    assert s["steps"] == total
    steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines() if '"train"' in l]
    assert steps == list(range(1, total + 1))  # every step logged exactly once across the preemption
