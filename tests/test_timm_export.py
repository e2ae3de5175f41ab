"""timm export: registration, the timm model contract, export -> `local-dir:` load equality on real
images, hooks for features_only, tracing, and safe loading (safetensors only, pickles refused)."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import timm
import retrain.timm as rt  # noqa: F401  (registers the sdarts_* entrypoints)
from retrain.export import from_genotype, from_run_dir, load, write
from retrain.model import build_network
from sdarts.data.constants import CIFAR_MEAN, CIFAR_STD
from sdarts.errors import CheckpointError, ExportError, GenotypeError
from sdarts.genotype import save as save_genotype
from sdarts.genotype import LITERATURE

from conftest import need_data, run_cli

# small sizes: every network here builds and runs in well under a second
SMALL = {
    "sdarts_darts_imagenet": dict(genotype="darts_v2", C=8, layers=3),
    "sdarts_darts_cifar": dict(genotype="pdarts", C=4, layers=3),
    "sdarts_nb201": dict(genotype="nb201_single_darts", C=4, N=1),
}
RES = {"sdarts_darts_imagenet": 64, "sdarts_darts_cifar": 32, "sdarts_nb201": 32}
#: documented features_only strides (docs/export.md)
STRIDES = {"sdarts_darts_imagenet": [2, 4, 8, 16, 32], "sdarts_darts_cifar": [1, 2, 4], "sdarts_nb201": [1, 2, 4]}


def real_images(res: int, n: int = 6, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> torch.Tensor:
    """n real ImageNet validation JPEGs: short side resized to res * 256/224 (res itself for res <= 32),
    centre-cropped to res x res, normalised."""
    from PIL import Image
    import torchvision.transforms.functional as TF
    root = need_data("imagenet-sample", "val")
    files = sorted(root.glob("*/*.JPEG"))[:n]
    out = []
    for f in files:
        img = Image.open(f).convert("RGB")
        img = TF.resize(img, res if res <= 32 else int(res * 256 / 224))
        img = TF.center_crop(img, [res, res])
        out.append(TF.normalize(TF.to_tensor(img), mean, std))
    return torch.stack(out)


def small(arch: str, **over) -> nn.Module:
    return timm.create_model(arch, **{**SMALL[arch], **over})


# -- registration and pretrained_cfg ---------------------------------------------------------------
def test_entrypoints_registered_with_honest_cfgs():
    names = set(timm.list_models("sdarts_*"))
    assert {"sdarts_darts_imagenet", "sdarts_darts_cifar", "sdarts_nb201", "sdarts_darts_v2_imagenet",
            "sdarts_darts_v2_cifar", "sdarts_pdarts_imagenet", "sdarts_pc_darts_imagenet",
            "sdarts_pc_darts_cifar", "sdarts_nb201_single_darts"} <= names
    assert "sdarts_pc_darts_imagenet_cifar" not in names  # a dataset-specific cell only on its dataset
    for arch in SMALL:
        m = small(arch).eval()
        cfg = m.pretrained_cfg
        first = m.get_submodule(cfg["first_conv"])
        assert isinstance(first, nn.Conv2d) and first.in_channels == cfg["input_size"][0] == 3
        assert m.get_submodule(cfg["classifier"]) is m.get_classifier()
        assert cfg["num_classes"] == m.num_classes
        assert cfg["interpolation"] == "bilinear"
        with torch.no_grad():
            f = m.forward_features(torch.zeros(1, *cfg["input_size"]))
        assert tuple(f.shape[-2:]) == tuple(cfg["pool_size"]), arch
    im, cf = timm.models.get_pretrained_cfg("sdarts_darts_imagenet"), timm.models.get_pretrained_cfg("sdarts_nb201")
    assert (im.input_size, im.crop_pct, im.mean, im.num_classes) == ((3, 224, 224), 0.875,
                                                                      (0.485, 0.456, 0.406), 1000)
    assert (cf.input_size, cf.crop_pct, cf.mean, cf.num_classes) == ((3, 32, 32), 1.0, CIFAR_MEAN, 10)
    with pytest.raises(RuntimeError, match="No pretrained weights"):
        timm.create_model("sdarts_nb201", pretrained=True)  # no entry claims weights it does not have


def test_literature_genotypes_by_name_and_every_genotype_form(tmp_path):
    by_arg = timm.create_model("sdarts_darts_imagenet", genotype="darts_v2")
    by_name = timm.create_model("sdarts_darts_v2_imagenet")
    n = sum(p.numel() for p in by_arg.parameters())
    assert abs(n - 4.7e6) < 0.05e6  # DARTS(V2) mobile setting, as published (no auxiliary head)
    assert n == sum(p.numel() for p in by_name.parameters())
    assert by_arg.state_dict().keys() == by_name.state_dict().keys()
    assert not any(k.startswith("auxiliary") for k in by_arg.state_dict())
    assert abs(sum(p.numel() for p in timm.create_model("sdarts_darts_v2_cifar").parameters()) - 3.3e6) < 0.05e6

    g = LITERATURE["pdarts"]
    save_genotype(g, tmp_path / "g.json")
    forms = [g, g.to_json(), "pdarts", json.dumps(g.to_json()), g.to_string(), str(tmp_path / "g.json")]
    keys = None
    for form in forms:
        m = timm.create_model("sdarts_darts_cifar", genotype=form, C=4, layers=3)
        shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
        keys = keys or shapes
        assert shapes == keys
    nb = timm.create_model("sdarts_nb201", genotype=LITERATURE["nb201_all_skip"].to_arch_str(), C=4, N=1)
    assert not any(p.numel() for n_, p in nb.named_parameters() if n_.startswith("cells.0."))  # all-skip cell
    with pytest.raises(GenotypeError, match="needs a darts genotype"):
        timm.create_model("sdarts_darts_imagenet", genotype="nb201_single_darts")
    with pytest.raises(GenotypeError, match="fixes its genotype"):
        timm.create_model("sdarts_darts_v2_imagenet", genotype="pdarts")
    with pytest.raises(GenotypeError):
        timm.create_model("sdarts_darts_cifar", genotype="Genotype(normal=__import__('os').system('true'))")


# -- the timm model contract -----------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(SMALL))
def test_timm_contract(arch):
    torch.manual_seed(0)
    m = small(arch, num_classes=5).eval()
    x = torch.randn(3, 3, RES[arch], RES[arch])
    with torch.no_grad():
        y = m(x)
        f = m.forward_features(x)
        assert isinstance(y, torch.Tensor) and y.shape == (3, 5) and m.num_classes == 5
        assert f.dim() == 4 and f.shape[1] == m.num_features
        pre = m.forward_head(f, pre_logits=True)
        assert pre.shape == (3, m.num_features)
        torch.testing.assert_close(pre, f.mean((2, 3)))
        torch.testing.assert_close(m.forward_head(f), y)
        clf = m.get_classifier()
        assert isinstance(clf, nn.Linear) and (clf.in_features, clf.out_features) == (m.num_features, 5)
        m.reset_classifier(0)
        torch.testing.assert_close(m(x), f.mean((2, 3)))  # pooled features
        m.reset_classifier(0, "")
        torch.testing.assert_close(m(x), f)  # unpooled maps
        m.reset_classifier(7, "avg")
        assert m(x).shape == (3, 7) and m.get_classifier().out_features == 7 and m.num_classes == 7
        m.reset_classifier(4, "avgmax")  # timm pool types keep working
        assert m(x).shape == (3, 4)
        m.train()
        assert isinstance(m(x), torch.Tensor)  # training forward is one tensor too (no auxiliary logits)
    assert not any(k.startswith("auxiliary") for k in m.state_dict())
    assert m.group_matcher()["blocks"] == r"^cells\.(\d+)"
    gray = small(arch, in_chans=1).eval()
    assert gray.get_submodule(gray.pretrained_cfg["first_conv"]).in_channels == 1
    with torch.no_grad():
        assert gray(torch.randn(2, 1, RES[arch], RES[arch])).shape == (2, gray.num_classes)


@pytest.mark.parametrize("arch", list(SMALL))
def test_drop_path_rate_and_drop_rate(arch):
    torch.manual_seed(0)
    plain = small(arch)
    dropped = small(arch, drop_path_rate=0.5, drop_rate=0.5)
    dropped.load_state_dict(plain.state_dict())
    assert dropped.drop_path_prob == 0.5 and isinstance(dropped.head_drop, nn.Dropout)
    x = torch.randn(4, 3, RES[arch], RES[arch])
    with torch.no_grad():
        plain.eval(), dropped.eval()
        torch.testing.assert_close(dropped(x), plain(x))  # identity in eval
        plain.train(), dropped.train()
        torch.manual_seed(1)
        a = plain.forward_features(x)
        torch.manual_seed(2)
        b = plain.forward_features(x)
        torch.testing.assert_close(a, b)  # no randomness without drop-path (BN uses batch stats)
        torch.manual_seed(1)
        c = dropped.forward_features(x)
        torch.manual_seed(2)
        d = dropped.forward_features(x)
        assert not torch.allclose(c, d)  # paths dropped at random in training
        assert not torch.allclose(a, c)


@pytest.mark.parametrize("arch", list(SMALL))
def test_grad_checkpointing_gives_the_same_gradients(arch):
    torch.manual_seed(0)
    m = small(arch, drop_path_rate=0.2).train()
    x = torch.randn(2, 3, RES[arch], RES[arch])

    def grads(checkpointing: bool) -> dict:
        m.set_grad_checkpointing(checkpointing)
        m.zero_grad()
        torch.manual_seed(3)  # same drop-path masks; checkpointing replays the RNG state
        m(x).logsumexp(1).sum().backward()
        return {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}

    ref, ckpt = grads(False), grads(True)
    assert m.grad_checkpointing and ref.keys() == ckpt.keys() and len(ref) > 0
    for k in ref:
        torch.testing.assert_close(ckpt[k], ref[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", list(SMALL))
def test_features_only_through_hooks(arch):
    torch.manual_seed(0)
    m = small(arch).eval()
    fm = timm.create_model(arch, features_only=True, **SMALL[arch]).eval()
    res = fm["body"].load_state_dict(m.state_dict(), strict=False)  # the model as it is, under `body`
    assert not res.missing_keys and res.unexpected_keys == ["classifier.weight", "classifier.bias"]
    assert fm.feature_info.reduction() == STRIDES[arch]
    res = RES[arch]
    x = torch.randn(2, 3, res, res)
    with torch.no_grad():
        feats = fm(x)
        last = m.forward_features(x)
    assert len(feats) == len(STRIDES[arch])
    for f, stride, chs in zip(feats, STRIDES[arch], fm.feature_info.channels()):
        assert f.shape == (2, chs, -(-res // stride), -(-res // stride))
    torch.testing.assert_close(feats[-1], last)  # the deepest feature is forward_features' map
    sub = timm.create_model(arch, features_only=True, out_indices=(1, 2), **SMALL[arch])
    assert sub.feature_info.reduction() == STRIDES[arch][1:3] and len(sub(x)) == 2


# torch 2.14 marks TorchScript tracing deprecated; deployments (C++ runtimes, older serving stacks) still
# load traced models, so the export keeps working with it and the test says so instead of warning
@pytest.mark.filterwarnings("ignore:`torch.jit.trace.*` is deprecated:FutureWarning")
@pytest.mark.parametrize("arch", list(SMALL))
def test_jit_trace_and_torch_export(arch):
    torch.manual_seed(0)
    m = small(arch).eval()
    x = torch.randn(2, 3, RES[arch], RES[arch])
    with torch.no_grad():
        ref = m(x)
        traced = torch.jit.trace(m, x)
        torch.testing.assert_close(traced(x), ref)
    ep = torch.export.export(m, (x,))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), ref)


# -- export from a trained run and load through `local-dir:` ---------------------------------------
def _retrain_config_yaml(dataset: str, C: int, layers: int, resolution: int, ema: float) -> str:
    """A resolved retrain config, exactly as retrain/train.py writes it (RetrainConfig dumped)."""
    from retrain.config import RetrainConfig
    from sdarts.config import build, dump
    cfg = build(RetrainConfig, {"model": {"C": C, "layers": layers}, "ema": {"decay": ema},
                                "data": {"dataset": dataset, "resolution": resolution}})
    return dump(cfg)


def _trained_run_dir(run: Path, images: torch.Tensor, genotype, ema: bool):
    """A few real SGD steps of the retrain ImageNet network (auxiliary head on) through a real DeepSpeed
    engine, saved as a DeepSpeed checkpoint with the retrain client state (retrain/train.py's keys);
    returns (trained network, the network with the EMA weights or None)."""
    import deepspeed
    from sdarts.distributed import init
    _, _, _, device = init("cpu")
    torch.manual_seed(0)
    net = build_network(genotype, "imagenet", 8, 3, 1000, auxiliary=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    ds = {"train_micro_batch_size_per_gpu": len(images), "gradient_accumulation_steps": 1,
          "train_batch_size": len(images), "zero_optimization": {"stage": 0}, "steps_per_print": 10 ** 9}
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=opt, config=ds)
    # the EMA as retrain/train.py keeps it: fp32 copies of the floating-point state, {"decay", "state"}
    ema_state = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()
                 if v.is_floating_point()} if ema else None
    y = torch.arange(len(images)) * 37 % 1000
    for _ in range(3):
        logits, aux = engine(images)
        loss = nn.functional.cross_entropy(logits, y) + 0.4 * nn.functional.cross_entropy(aux, y)
        engine.backward(loss)
        engine.step()
        if ema_state is not None:
            with torch.no_grad():
                for k, v in engine.module.state_dict().items():
                    if k in ema_state:
                        ema_state[k].mul_(0.5).add_(v.float(), alpha=0.5)
    client = {"kind": "retrain", "genotype": genotype.to_json(), "epoch": 1, "step": 3,
              "ema": {"decay": 0.5, "state": ema_state} if ema_state is not None else None}
    ckpt = run / "checkpoints"
    engine.save_checkpoint(str(ckpt), tag="step000000003", client_state=client, save_latest=False)
    (ckpt / "latest").write_text("step000000003")
    (run / "config.yaml").write_text(_retrain_config_yaml("imagenet", 8, 3, images.shape[-1], 0.5 if ema else 0))
    save_genotype(genotype, run / "genotype.json")
    net = engine.module.eval()
    if ema_state is not None:
        trained_ema = build_network(genotype, "imagenet", 8, 3, 1000, auxiliary=True)
        sd = net.state_dict()
        sd.update(ema_state)
        trained_ema.load_state_dict(sd)
        return net, trained_ema.eval()
    return net, None


def test_export_of_a_trained_run_loads_with_the_same_outputs_on_real_images(tmp_path):
    images = real_images(224, n=4)  # the ImageNet auxiliary head needs its 7x7 map (224x224 input)
    run = tmp_path / "run"
    run.mkdir()
    trained, trained_ema = _trained_run_dir(run, images, LITERATURE["darts_v2"], ema=True)

    out = write(from_run_dir(run), tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "sdarts_darts_imagenet" and cfg["sdarts"]["weights"] == "ema"
    assert cfg["model_args"] == {"genotype": LITERATURE["darts_v2"].to_json(), "C": 8, "layers": 3,
                                 "num_classes": 1000}
    assert cfg["pretrained_cfg"]["input_size"] == [3, 224, 224] and cfg["pretrained_cfg"]["pool_size"] == [7, 7]

    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    # the export's own data config, through timm's transforms, on the real JPEGs
    from PIL import Image
    data_cfg = timm.data.resolve_data_config({}, model=loaded)
    assert tuple(data_cfg["input_size"]) == (3, 224, 224) and data_cfg["crop_pct"] == 0.875
    tf = timm.data.create_transform(**data_cfg)
    files = sorted(need_data("imagenet-sample", "val").glob("*/*.JPEG"))[:4]
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    torch.testing.assert_close(x, images, atol=0.05, rtol=0)  # same preprocessing as real_images()
    with torch.no_grad():
        for batch in (x, real_images(160, n=4)):  # the trained resolution and another one
            torch.testing.assert_close(loaded(batch), trained_ema(batch)[0], rtol=1e-4, atol=1e-5)
            assert not torch.allclose(loaded(batch), trained(batch)[0], atol=1e-5)  # EMA differs from raw

    raw = load(write(from_run_dir(run, ema=False), tmp_path / "export_raw"))
    with torch.no_grad():
        torch.testing.assert_close(raw.eval()(images), trained(images)[0], rtol=1e-4, atol=1e-5)

    # another head on load: timm drops the exported classifier, the body keeps its weights
    k5 = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=5).eval()
    with torch.no_grad():
        torch.testing.assert_close(k5.forward_features(images), loaded.forward_features(images))
    feats = timm.create_model(f"local-dir:{out}", pretrained=True, features_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(feats(images)[-1], loaded.forward_features(images))
    # timm's own hub writer round-trips the model (what push_to_hf_hub uploads)
    pytest.importorskip("huggingface_hub")
    from timm.models._hub import save_for_hf
    save_for_hf(loaded, str(tmp_path / "hf"), safe_serialization=True)
    again = timm.create_model(f"local-dir:{tmp_path / 'hf'}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(images), loaded(images))
    # without pretrained=True timm builds the same architecture with fresh weights (its convention)
    fresh = timm.create_model(f"local-dir:{out}")
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in loaded.state_dict().items()}


def test_loading_an_export_reads_safetensors_only(tmp_path, monkeypatch):
    out = write(from_genotype("nb201_single_darts", "cifar10", C=4, layers=1, seed=3), tmp_path / "e")
    ref = timm.create_model("sdarts_nb201", genotype="nb201_single_darts", C=4, N=1)
    ref_sd = from_genotype("nb201_single_darts", "cifar10", C=4, layers=1, seed=3).state_dict

    def no_pickle(*a, **k):
        raise AssertionError("torch.load called while loading an export")
    monkeypatch.setattr(torch, "load", no_pickle)
    m = load(out)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, ref_sd[k])
    assert m.state_dict().keys() == ref.state_dict().keys()


class _Exploit:
    """Unpickling this runs a command: what a crafted checkpoint would do to a plain torch.load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickles_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    (run / "checkpoints" / "step1").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step1")
    (run / "config.yaml").write_text(_retrain_config_yaml("cifar10", 4, 3, 32, 0))
    save_genotype(LITERATURE["darts_v2"], run / "genotype.json")
    with open(run / "checkpoints" / "step1" / "mp_rank_00_model_states.pt", "wb") as f:
        pickle.dump({"module": _Exploit(marker)}, f, protocol=2)  # torch.save's protocol
    with pytest.raises(CheckpointError, match="refused"):
        from_run_dir(run)
    assert not marker.exists()

    # an export folder with a pickled weights file instead of model.safetensors: refused before timm reads it
    out = write(from_genotype("darts_v2", "cifar10", C=4, layers=3), tmp_path / "e")
    (out / "model.safetensors").unlink()
    with open(out / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Exploit(marker), f, protocol=2)
    with pytest.raises(CheckpointError, match="safetensors only"):
        timm.create_model(f"local-dir:{out}", pretrained=True)
    assert not marker.exists()


def test_bad_inputs_are_one_line_and_leave_nothing(tmp_path):
    with pytest.raises(ExportError, match="not found"):
        from_run_dir(tmp_path / "nope")
    search = tmp_path / "search"
    search.mkdir()
    (search / "config.yaml").write_text("space: darts\nstrategy: single_level\n")
    with pytest.raises(ExportError, match="search run.*--genotype"):
        from_run_dir(search)
    run = tmp_path / "run"
    (run / "checkpoints" / "s").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("s")
    (run / "config.yaml").write_text(_retrain_config_yaml("cifar10", 4, 3, 32, 0))
    save_genotype(LITERATURE["darts_v2"], run / "genotype.json")
    (run / "checkpoints" / "s" / "mp_rank_00_model_states.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        from_run_dir(run)
    # weights of another size: refused before anything is written
    other = build_network(LITERATURE["darts_v2"], "cifar10", 6, 3, 10, auxiliary=True)
    torch.save({"module": other.state_dict(), "kind": "retrain"},
               run / "checkpoints" / "s" / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        write(from_run_dir(run), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    e = from_genotype("darts_v2", "cifar10", C=4, layers=3)
    with pytest.raises(ExportError, match="not empty.*--force"):
        write(e, tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").exists()
    write(e, tmp_path / "busy", force=True)
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["config.json", "model.safetensors"]


# -- the command -----------------------------------------------------------------------------------
def test_cli_export_genotype_and_errors(tmp_path, capsys):
    out = tmp_path / "g"
    r = run_cli(["launcher/cli.py", "export", "--genotype", "pc_darts_cifar", "--dataset", "cifar10",
                 "--layers", "3", "--channels", "4", "--out", str(out), "--seed", "1"])
    assert r.returncode == 0, r.stderr
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert line["architecture"] == "sdarts_darts_cifar" and line["weights"] == "random"
    m = load(out)
    assert m.num_classes == 10 and sum(p.numel() for p in m.parameters()) == line["params"]

    # bad input: one line, exit 2, through the real command (a subprocess: in-process runs under
    # pytest's capture collide with handlers earlier tests bound to their own, since closed, streams)
    bad = [
        (["--run-dir", str(tmp_path / "missing")], "run directory not found"),
        (["--genotype", "no_such_cell"], "genotype file not found"),
        (["--genotype", "darts_v2", "--layers", "0"], "--layers must be a positive"),
        (["--run-dir", str(tmp_path), "--layers", "3"], "--layers applies to --genotype only"),
        (["--genotype", "darts_v2", "--channels", "4", "--layers", "3", "--dataset", "cifar10"], "not empty"),
    ]
    for extra, msg in bad:
        dest = out if msg == "not empty" else tmp_path / "never"
        r = run_cli(["launcher/cli.py", "export", *extra, "--out", str(dest)])
        err = [l for l in r.stderr.strip().splitlines() if l.startswith("error:")]
        assert r.returncode == 2 and len(err) == 1 and msg in err[0] and "Traceback" not in r.stderr, (extra, r.stderr)
    assert not (tmp_path / "never").exists()


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_real_retrain_run_exports_and_reloads(tmp_path, capsys):
    """End to end with the real retrain launcher (CIFAR-10 subset, EMA on), then `sdarts export`."""
    npz = need_data("cifar10-subset", "cifar10_subset.npz")
    run = tmp_path / "run"
    r = run_cli(["launcher/retrain.py", "--config", "configs/retrain/cifar10.yaml", "--genotype", "darts_v2",
                 "--run-dir", str(run), "--set", "epochs=1", "--set", "model.C=4", "--set", "model.layers=3",
                 "--set", f"data.root={npz}", "--set", "data.max_per_split=64", "--set", "data.micro_batch=16",
                 "--set", "ema.decay=0.9", "--set", "log.progress=false", "--set", "log.tensorboard=false"],
                env={"MASTER_PORT": str(_free_port())})  # not the port of this process's own group
    assert r.returncode == 0, r.stderr[-2000:]
    for extra, weights in (([], "ema"), (["--no-ema"], "model"), (["--checkpoint", "best"], "ema")):
        out = tmp_path / f"export{len(extra)}{weights}"
        if not extra:  # the command as a process once; the variants in-process (same entry point)
            r = run_cli(["launcher/cli.py", "export", "--run-dir", str(run), "--out", str(out)])
            assert r.returncode == 0, r.stderr[-2000:]
            stdout = r.stdout
        else:
            from launcher.cli import main
            assert main(["export", "--run-dir", str(run), "--out", str(out), *extra]) == 0
            stdout = capsys.readouterr().out
        assert json.loads(stdout.strip().splitlines()[-1])["weights"] == weights

        tag = (run / "checkpoints" / "latest").read_text().strip()
        if extra[:1] == ["--checkpoint"]:
            sd = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["module"]
        else:
            obj = torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=True)
            sd = dict(obj["module"])
            if weights == "ema":
                sd.update(obj["ema"]["state"])
        net = build_network(LITERATURE["darts_v2"], "cifar10", 4, 3, 10, auxiliary=True)
        net.load_state_dict(sd)
        x = real_images(32, n=8, mean=CIFAR_MEAN, std=CIFAR_STD)
        with torch.no_grad():
            torch.testing.assert_close(load(out).eval()(x), net.eval()(x)[0], rtol=1e-4, atol=1e-5)
