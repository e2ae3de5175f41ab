"""`engine.cuda_graphs`: refused where it cannot work (CPU here), and on a GPU the recorded step must
follow the eager one (the CUDA tests skip on CPU machines; the device check runs them)."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli
from sdarts.config import SearchConfig, build
from sdarts.errors import ConfigError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("override, culprit", [
    ("strategy=bilevel_second_order", "bilevel_second_order"),
    ("precision=fp16", "fp16"),
    ("model.checkpoint_cells=true", "checkpoint_cells"),
])
def test_incompatible_settings_are_refused(override, culprit):
    with pytest.raises((ConfigError, ValueError)) as e:
        build(SearchConfig, {}, ["engine.cuda_graphs=true", override])
    assert "engine.cuda_graphs" in str(e.value) and culprit in str(e.value)


def test_auto_is_on_only_for_the_measured_path():
    cfg = build(SearchConfig, {}, [])
    assert cfg.engine.cuda_graphs == "auto"
    assert cfg.cuda_graphs_on("cuda") and not cfg.cuda_graphs_on("cpu")
    for override in ("space=darts", "precision=fp16", "strategy=bilevel_second_order", "model.checkpoint_cells=true"):
        assert not build(SearchConfig, {}, [override]).cuda_graphs_on("cuda"), override
    assert build(SearchConfig, {}, ["space=darts", "engine.cuda_graphs=true"]).cuda_graphs_on("cuda")
    assert not build(SearchConfig, {}, ["engine.cuda_graphs=false"]).cuda_graphs_on("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cpu_run_exits_2_naming_the_key(tmp_path):
    r = run_cli(["launcher/search.py", "--config", "configs/search/smoke.yaml", "--run-dir", str(tmp_path / "r"),
                 "--set", "engine.cuda_graphs=true", "--set", "log.progress=false"], timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert "engine.cuda_graphs" in lines[-1] and "CUDA" in lines[-1]
    assert not (tmp_path / "r" / "checkpoints").exists() and not (tmp_path / "r" / "config.yaml").exists()


def _pair(space: str, impl: str):
    from sdarts.spaces.darts import DartsSupernet
    from sdarts.spaces.nb201 import NB201Supernet

    def make():
        g = torch.Generator().manual_seed(3)
        if space == "nb201":
            return NB201Supernet(8, 2, 10, "softmax", 0.0, 1e-3, impl=impl, generator=g)
        return DartsSupernet(4, 5, 10, "cifar", "softmax", 0.0, 1e-3, 3, g, impl=impl)
    nets = [make(), make()]
    nets[1].load_state_dict(nets[0].state_dict())  # conv weights come from the global RNG
    return [n.cuda() for n in nets]


@cuda
@pytest.mark.parametrize("space, impl", [("nb201", "fused"), ("nb201", "classic"), ("darts", "fused"),
                                         ("darts", "grouped")])
def test_recorded_steps_follow_eager_steps(space, impl):
    """Five SGD steps on real-shaped batches: logits, alphas, weights and BN statistics of the graphed
    net stay with the eager one; another batch size and eval mode run eagerly. (The NB201 cases passed
    on an H200; the DARTS cases are the check `engine.cuda_graphs: auto` needs before it covers DARTS.)"""
    from sdarts.graphs import install
    from sdarts.engine import CombinedOptimizer
    torch.backends.cudnn.deterministic = True
    eager, graphed = _pair(space, impl)
    alphas0 = [a.detach().clone() for a in eager.get_alphas()]
    gen = torch.Generator(device="cuda").manual_seed(0)
    xs = [torch.randn(16, 3, 32, 32, device="cuda", generator=gen) for _ in range(5)]
    ys = [torch.randint(0, 10, (16,), device="cuda", generator=gen) for _ in range(5)]
    assert install(graphed, xs[0])
    opts = [CombinedOptimizer(n.get_weights(), n.get_alphas(), w_lr=0.05, w_momentum=0.9, w_weight_decay=3e-4,
                              w_nesterov=False, alpha_rule="adam", alpha_lr=3e-3, grad_clip=5.0)
            for n in (eager, graphed)]
    for x, y in zip(xs, ys):
        outs = []
        for net, opt in zip((eager, graphed), opts):
            opt.zero_grad(set_to_none=True)
            out = net(x)
            F.cross_entropy(out, y).backward()
            opt.step()
            outs.append(out.detach().clone())
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-3, atol=1e-3)
    for a, b in zip(eager.get_alphas(), graphed.get_alphas()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)
    assert max((a - a0).abs().max().item() for a, a0 in zip(graphed.get_alphas(), alphas0)) > 0  # it learned
    for a, b in zip(eager.get_weights(), graphed.get_weights()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)
    for a, b in zip(eager.buffers(), graphed.buffers()):
        torch.testing.assert_close(b.float(), a.float(), rtol=1e-3, atol=1e-3)
    x8 = xs[0][:8]
    torch.testing.assert_close(graphed(x8), eager(x8), rtol=1e-3, atol=1e-3)  # other shape: eager path
    eager.eval(), graphed.eval()
    with torch.no_grad():
        torch.testing.assert_close(graphed(xs[1]), eager(xs[1]), rtol=1e-3, atol=1e-3)


@cuda
def test_search_with_graphs_matches_eager_search(tmp_path):
    """The real launcher on the GPU, graphed and eager: same genotype trajectory, alphas within float noise."""
    runs = {}
    for name, flag in (("eager", "false"), ("graphs", "true")):
        r = run_cli(["launcher/search.py", "--config", "configs/search/smoke.yaml", "--run-dir", str(tmp_path / name),
                     "--set", f"engine.cuda_graphs={flag}", "--set", "log.progress=false",
                     "--set", "log.tensorboard=false"], timeout=600,
                    env={"DS_ACCELERATOR": "cuda", "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")})
        assert r.returncode == 0, r.stderr[-3000:]
        assert "recording failed" not in r.stderr
        runs[name] = final_weights(tmp_path / name)
    init = final_weights(tmp_path / "eager", line=0)
    assert (runs["eager"] - init).abs().max() > 1e-5  # alpha moved, so agreeing says something
    torch.testing.assert_close(runs["graphs"], runs["eager"], rtol=0, atol=1e-4)


def final_weights(run_dir, line: int = -1) -> torch.Tensor:
    """All activated edge weights of one alphas.jsonl record, flattened ([cells][edges][ops])."""
    rec = json.loads((run_dir / "alphas.jsonl").read_text().splitlines()[line])
    return torch.tensor([x for cell in sorted(rec["weights"]) for row in rec["weights"][cell] for x in row],
                        dtype=torch.float64)
