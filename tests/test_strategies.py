"""One search step of each strategy through the real DeepSpeed engine (CPU, gloo, one rank)."""
import pytest
import torch

from search_helpers import changed, make, snapshot, tiny_cfg


def test_single_level_updates_w_and_alpha_from_the_same_batch():
    se, strat, tr, _ = make(tiny_cfg(strategy="single_level"))
    w0, a0 = snapshot(se.module)
    res = strat.step(iter(tr), None)
    w1, a1 = snapshot(se.module)
    assert changed(w0, w1) and changed(a0, a1)
    # one batch fed both updates
    assert len(res.alpha_ids) == 1 and res.alpha_ids[0] is res.w_ids[0]


@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_alpha_still_moves(autocast):
    """The known failure: a separate low-precision Adam on alpha at lr 3e-4 never moves it (bf16 rounding).
    Through the combined optimizer alpha keeps an fp32 master copy and moves after a few steps."""
    se, strat, tr, _ = make(tiny_cfg(precision="bf16", **{"engine.autocast": autocast, "optim.alpha.lr": 3e-4}))
    a0 = [a.detach().float().clone() for a in se.module.get_alphas()]
    it = iter(tr)
    for _ in range(3):
        strat.step(it, None)
    if autocast:  # parameters stay fp32; BN runs in fp32
        assert all(a.dtype == torch.float32 for a in se.module.get_alphas())
    # fp32 master: compare the optimizer's own copy, which is what later steps build on
    masters = [p for g in se.engine.optimizer.param_groups if g.get("tag") == "alpha" for p in g["params"]]
    moved = max(float((m.detach().float().reshape(-1)[: a.numel()] - a.reshape(-1)).abs().max())
                for m, a in zip(masters, a0))
    assert moved > 1e-4  # three Adam steps at 3e-4 move alpha by ~9e-4


def test_bilevel_alpha_never_sees_training_batches():
    se, strat, tr, va = make(tiny_cfg(strategy="bilevel"))
    train_ids = set(tr.ids.tolist())
    valid_ids = set(va.ids.tolist())
    assert train_ids.isdisjoint(valid_ids)
    it, vit = iter(tr), va.cycle()
    w0, a0 = snapshot(se.module)
    for _ in range(3):
        res = strat.step(it, vit)
        for ids in res.alpha_ids:
            assert set(ids.tolist()) <= valid_ids
        for ids in res.w_ids:
            assert set(ids.tolist()) <= train_ids
    w1, a1 = snapshot(se.module)
    assert changed(w0, w1) and changed(a0, a1)


def test_bilevel_phases_step_only_their_group():
    se, strat, tr, va = make(tiny_cfg(strategy="bilevel"))
    b = next(iter(tr))
    w0, a0 = snapshot(se.module)
    strat.engine.backward(torch.nn.functional.cross_entropy(se.forward(b.x), b.y))
    strat.engine.step({"alpha"})
    w1, a1 = snapshot(se.module)
    assert not changed(w0, w1) and changed(a0, a1)
    strat.engine.backward(torch.nn.functional.cross_entropy(se.forward(b.x), b.y))
    strat.engine.step({"w"})
    w2, a2 = snapshot(se.module)
    assert changed(w1, w2) and not changed(a1, a2)


def test_two_batch_uses_two_different_training_batches():
    se, strat, tr, va = make(tiny_cfg(strategy="two_batch"))
    res = strat.step(iter(tr), None)
    train_ids = set(tr.ids.tolist())
    a, w = set(res.alpha_ids[0].tolist()), set(res.w_ids[0].tolist())
    assert a <= train_ids and w <= train_ids and a.isdisjoint(w)


def test_second_order_matches_finite_difference_formula():
    """Unrolled alpha gradient: with xi = lr -> 0 it reduces to the first-order gradient on the valid batch."""
    se, strat, tr, va = make(tiny_cfg(strategy="bilevel_second_order"))
    bt, bv = next(iter(tr)), next(iter(va))
    se.opt.set_lr("w", 1e-12)
    g2 = strat._alpha_grad(bt, bv)
    model = se.module
    loss = torch.nn.functional.cross_entropy(model(bv.x), bv.y)
    g1 = torch.autograd.grad(loss, model.get_alphas())
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-3)
    w0, a0 = snapshot(se.module)
    se.opt.set_lr("w", 0.025)
    strat.step(iter(tr), iter(va))
    w1, a1 = snapshot(se.module)
    assert changed(w0, w1) and changed(a0, a1)


def test_second_order_refuses_mixed_precision():
    from sdarts.config import ConfigError
    with pytest.raises(ConfigError, match="fp32"):
        tiny_cfg(strategy="bilevel_second_order", precision="bf16")


def test_nan_loss_stops_before_any_update():
    from sdarts.data import Batch
    from sdarts.search.strategies import NumericalFault
    se, strat, tr, _ = make(tiny_cfg(strategy="single_level"))
    b = next(iter(tr))
    bad = Batch(torch.full_like(b.x, float("nan")), b.y, b.ids)
    w0, a0 = snapshot(se.module)
    with pytest.raises(NumericalFault, match="non-finite loss"):
        strat.step(iter([bad]), None)
    w1, a1 = snapshot(se.module)
    assert not changed(w0, w1) and not changed(a0, a1)
