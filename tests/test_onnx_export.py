"""`sdarts export --format onnx|both`: model.onnx run by onnxruntime gives the eager logits on real images
(CIFAR-10 test images for every literature genotype of the zoo, ImageNet validation JPEGs for a run with
retrained weights), at batch sizes other than the traced one; the auxiliary head and drop-path are not in
the graph; a failed check or a missing onnxruntime is one line and leaves nothing written.

Sizes are small (C=4, 3 cells; NB201 one cell per stage): each export takes seconds.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install 'sdarts[onnx]')")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed (pip install 'sdarts[onnx]')")
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import timm  # noqa: E402

import retrain.timm  # noqa: E402,F401  (registers the sdarts_* entrypoints)
from retrain import onnx_export  # noqa: E402
from retrain.export import from_genotype, write  # noqa: E402
from retrain.model import build_network  # noqa: E402
from sdarts.data.constants import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from sdarts.genotype import LITERATURE  # noqa: E402
from sdarts.genotype import save as save_genotype  # noqa: E402

from conftest import need_data  # noqa: E402

ATOL = 1e-4
RANDOM_OPS = {"Dropout", "RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Bernoulli"}


def _cifar_uint8(n: int, start: int = 0) -> np.ndarray:
    data = np.load(need_data("cifar10-subset", "cifar10_subset.npz"))
    return data["x_test"][start:start + n]


def _cifar_batch(n: int, start: int = 0) -> torch.Tensor:
    x = _cifar_uint8(n, start).astype(np.float32) / 255.0
    x = (x - np.asarray(CIFAR_MEAN, np.float32)) / np.asarray(CIFAR_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory) -> Path:
    """Real CIFAR-10 test images as PNG files, the --check-images folder of the CIFAR exports."""
    from PIL import Image
    d = tmp_path_factory.mktemp("cifar_png")
    for i, img in enumerate(_cifar_uint8(3, start=100)):
        Image.fromarray(img).save(d / f"{i}.png")
    return d


def _imagenet_batch(n: int, res: int) -> torch.Tensor:
    """Real ImageNet validation JPEGs, preprocessed independently of the library (torchvision)."""
    from PIL import Image
    import torchvision.transforms.functional as TF
    files = sorted(need_data("imagenet-sample", "val").glob("*/*.JPEG"))[-n:]
    out = []
    for f in files:
        img = TF.center_crop(TF.resize(Image.open(f).convert("RGB"), int(res * 256 / 224)), [res, res])
        out.append(TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD))
    return torch.stack(out)


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _ort(sess: ort.InferenceSession, x: torch.Tensor) -> np.ndarray:
    return sess.run(["logits"], {"input": x.numpy()})[0]


def _graph_facts(path: Path) -> tuple[onnx.ModelProto, dict]:
    m = onnx.load(str(path))
    props = {p.key: p.value for p in m.metadata_props}
    return m, json.loads(props["sdarts"])


def _assert_clean_graph(m: onnx.ModelProto) -> None:
    assert m.opset_import[0].version == onnx_export.OPSET == 18
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value  # a symbolic batch axis, not a fixed one
    assert m.graph.output[0].type.tensor_type.shape.dim[0].dim_param == dims[0].dim_param
    assert not RANDOM_OPS & {n.op_type for n in m.graph.node}  # no drop-path, no dropout
    names = [i.name for i in m.graph.initializer] + [n.name for n in m.graph.node]
    assert not [n for n in names if "aux" in n.lower()]


@pytest.mark.parametrize("name", list(LITERATURE))
def test_every_literature_genotype_matches_eager_on_cifar_images(tmp_path, cifar_dir, name):
    g = LITERATURE[name]
    size = dict(C=4, layers=1 if g.space == "nb201" else 3)
    export = from_genotype(name, "cifar10", seed=7, **size)
    out = write(export, tmp_path / "e", formats=("onnx",), check_images=cifar_dir)
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]
    m, meta = _graph_facts(out / "model.onnx")
    _assert_clean_graph(m)
    check = meta["onnx_check"]
    assert check == export.provenance["onnx"]
    assert check["trace_batch"] == 2 and check["batches"] == [6, 1] and check["max_abs_diff"] <= ATOL
    assert meta["model_args"]["genotype"] == g.to_json() and meta["pretrained_cfg"]["input_size"] == [3, 32, 32]

    # an eager reference built here (not the exporter's model), on other real images, at batch 5 and 1
    arch = "sdarts_nb201" if g.space == "nb201" else "sdarts_darts_cifar"
    torch.manual_seed(7)
    eager = timm.create_model(arch, genotype=name, C=4, **({"N": 1} if g.space == "nb201" else {"layers": 3})).eval()
    sess = _session(out / "model.onnx")
    for x in (_cifar_batch(5), _cifar_batch(1, start=7)):
        with torch.no_grad():
            ref = eager(x).numpy()
        got = _ort(sess, x)
        assert got.shape == (len(x), 10)
        assert np.abs(got - ref).max() <= ATOL, (name, np.abs(got - ref).max())
        assert np.abs(ref).max() > 1e-3  # the comparison is not between two near-zero outputs


def _run_with_retrained_weights(run: Path) -> torch.nn.Module:
    """A retrain run directory (config.yaml, genotype.json, checkpoints/best.pt) whose weights and BN
    statistics are moved well away from init, auxiliary head included, as retrain/train.py saves them;
    returns the retrain network (auxiliary head on) holding those weights."""
    from test_timm_export import _retrain_config_yaml
    g = LITERATURE["darts_v2"]
    torch.manual_seed(3)
    net = build_network(g, "imagenet", 8, 3, 1000, auxiliary=True)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for k, v in net.state_dict().items():
            if k.endswith("running_var"):
                v.copy_(0.5 + torch.rand(v.shape, generator=gen))
            elif v.is_floating_point():
                v.add_(0.1 * torch.randn(v.shape, generator=gen))
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"module": net.state_dict(), "source": "model", "epoch": 3, "top1": 1.5},
               run / "checkpoints" / "best.pt")
    (run / "config.yaml").write_text(_retrain_config_yaml("imagenet", 8, 3, 96, 0))
    save_genotype(g, run / "genotype.json")
    assert any(k.startswith("auxiliary_head.") for k in net.state_dict())
    return net.eval()


def test_run_with_retrained_weights_round_trips_on_imagenet_jpegs(tmp_path, capsys):
    from launcher.cli import main
    run, out = tmp_path / "run", tmp_path / "export"
    trained = _run_with_retrained_weights(run)
    jpegs = need_data("imagenet-sample", "val")
    assert main(["export", "--run-dir", str(run), "--checkpoint", "best", "--format", "both",
                 "--check-images", str(jpegs), "--out", str(out)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["formats"] == ["timm", "onnx"] and line["weights"] == "model"
    assert line["onnx"]["max_abs_diff"] <= ATOL and line["onnx"]["batches"] == [16, 1]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.onnx", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    m, meta = _graph_facts(out / "model.onnx")
    assert cfg["sdarts"]["onnx"] == line["onnx"] == meta["onnx_check"]
    assert meta["pretrained_cfg"]["input_size"] == [3, 96, 96] and meta["architecture"] == "sdarts_darts_imagenet"
    _assert_clean_graph(m)

    sess = _session(out / "model.onnx")
    x = _imagenet_batch(5, 96)
    with torch.no_grad():
        ref = trained(x)[0].numpy()  # the retrain network's main logits (its aux head is eval-off)
        fresh = timm.create_model("sdarts_darts_imagenet", genotype="darts_v2", C=8, layers=3).eval()(x).numpy()
    got = _ort(sess, x)
    assert got.shape == (5, 1000)
    assert np.abs(got - ref).max() <= ATOL, np.abs(got - ref).max()
    assert np.abs(got - fresh).max() > 100 * ATOL  # the retrained weights, not an init
    # the ONNX file holds no auxiliary-head weights: its initializers are the timm state dict's tensors
    sd_numel = sum(v.numel() for k, v in trained.state_dict().items()
                   if not k.startswith("auxiliary_head.") and not k.endswith("num_batches_tracked"))
    onnx_numel = sum(int(np.prod(i.dims)) for i in m.graph.initializer)
    assert onnx_numel < sd_numel < sum(v.numel() for v in trained.state_dict().values())


def test_a_failed_check_is_one_line_and_writes_nothing(tmp_path, cifar_dir, monkeypatch, capsys):
    """An ONNX file that does not compute what the eager model does (here: exported from a copy with
    other weights) fails the export with one line, and no folder appears."""
    import copy
    from launcher.cli import main
    real_export = onnx_export._torch_export

    def export_other_weights(model, input_size, name):
        other = copy.deepcopy(model)
        with torch.no_grad():
            for p in other.parameters():
                p.add_(0.05)
        return real_export(other, input_size, name)

    monkeypatch.setattr(onnx_export, "_torch_export", export_other_weights)
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        main(["export", "--genotype", "nb201_single_darts", "--dataset", "cifar10", "--channels", "4",
              "--layers", "1", "--format", "both", "--check-images", str(cifar_dir), "--out", str(out)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == 2
    assert len(err) == 1 and err[0].startswith("error: ONNX check failed") and "differ by up to" in err[0], err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_missing_onnxruntime_is_one_line(tmp_path, monkeypatch, capsys):
    from launcher.cli import main
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        main(["export", "--genotype", "darts_v2", "--format", "both", "--out", str(out)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == 2 and len(err) == 1, err
    assert "onnxruntime" in err[0] and "pip install 'sdarts[onnx]'" in err[0] and "onnxscript" not in err[0]
    assert not out.exists()


def test_bad_onnx_arguments_are_one_line(tmp_path, capsys):
    from launcher.cli import main
    for extra, msg in ((["--check-images", str(tmp_path)], "--check-images applies to --format onnx|both"),
                       (["--format", "onnx", "--check-images", str(tmp_path / "no")], "not a directory"),
                       (["--format", "onnx", "--check-images", str(tmp_path)], "no .jpg/.jpeg/.png files")):
        with pytest.raises(SystemExit) as e:
            main(["export", "--genotype", "nb201_all_skip", "--dataset", "cifar10", "--channels", "4",
                  "--layers", "1", *extra, "--out", str(tmp_path / "never")])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert e.value.code == 2 and len(err) == 1 and msg in err[0], (extra, err)
    assert not (tmp_path / "never").exists()
