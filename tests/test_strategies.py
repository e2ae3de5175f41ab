"""One search step of each strategy through the real DeepSpeed engine (CPU, gloo, one rank)."""
import pytest
import torch

from search_helpers import changed, grads_at, make, max_rel_diff, plain_sgd_cfg, snapshot, tiny_cfg


def _deltas(module, step):
    """(w1 - w0, alpha1 - alpha0) of `step()`, and w0, alpha0."""
    w0, a0 = snapshot(module)
    step()
    w1, a1 = snapshot(module)
    return [x - y for x, y in zip(w1, w0)], [x - y for x, y in zip(a1, a0)], w0, a0


def test_single_level_updates_w_and_alpha_from_the_same_batch():
    """Plain SGD on both groups: one single-level step on batch b is w0 - lr_w * dL_b/dw and
    alpha0 - lr_a * dL_b/dalpha, both gradients at (w0, alpha0) on that one batch; the update that a
    different batch would give is far off (rel diff 1.4-1.5). Correct code: rel diff 5e-8 (alpha),
    4e-6 (w), tolerance 1e-3. Verified to catch: SingleLevel.step updating w from its batch and alpha
    from the next one (alpha rel diff 1.67)."""
    engine, strategy, tr, _ = make(plain_sgd_cfg(strategy="single_level", **{"optim.alpha.lr": 0.1}))
    it = iter(tr)
    b, other = next(it), next(it)  # a step that drew a second batch would get `other`
    lr_w, lr_a = engine.optimizer.lr("w"), engine.optimizer.lr("alpha")
    w0, a0 = snapshot(engine.module)
    gw, ga = grads_at(engine.module, b, w0, a0)
    gw2, ga2 = grads_at(engine.module, other, w0, a0)
    dw, da, _, _ = _deltas(engine.module, lambda: strategy.step(iter([b, other]), None))
    assert max_rel_diff(dw, [-lr_w * g for g in gw]) < 1e-3
    assert max_rel_diff(da, [-lr_a * g for g in ga]) < 1e-3
    # the check can tell batches apart
    assert max_rel_diff(dw, [-lr_w * g for g in gw2]) > 0.1
    assert max_rel_diff(da, [-lr_a * g for g in ga2]) > 0.1


@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_alpha_still_moves(autocast):
    """The known failure: a separate low-precision Adam on alpha at lr 3e-4 never moves it (bf16 rounding).
    Through the combined optimizer alpha keeps an fp32 master copy and moves after a few steps."""
    engine, strategy, tr, _ = make(tiny_cfg(precision="bf16", **{"engine.autocast": autocast, "optim.alpha.lr": 3e-4}))
    a0 = [a.detach().float().clone() for a in engine.module.get_alphas()]
    it = iter(tr)
    for _ in range(3):
        strategy.step(it, None)
    if autocast:  # parameters stay fp32; BN runs in fp32
        assert all(a.dtype == torch.float32 for a in engine.module.get_alphas())
    # fp32 master: compare the optimizer's own copy, which is what later steps build on
    masters = [p for g in engine.ds_engine.optimizer.param_groups if g.get("tag") == "alpha" for p in g["params"]]
    moved = max(float((m.detach().float().reshape(-1)[: a.numel()] - a.reshape(-1)).abs().max())
                for m, a in zip(masters, a0))
    assert moved > 1e-4  # three Adam steps at 3e-4 move alpha by ~9e-4


def test_bilevel_alpha_never_sees_training_batches():
    engine, strategy, tr, va = make(tiny_cfg(strategy="bilevel"))
    train_ids = set(tr.ids.tolist())
    valid_ids = set(va.ids.tolist())
    assert train_ids.isdisjoint(valid_ids)
    it, vit = iter(tr), va.cycle()
    w0, a0 = snapshot(engine.module)
    for _ in range(3):
        res = strategy.step(it, vit)
        for ids in res.alpha_ids:
            assert set(ids.tolist()) <= valid_ids
        for ids in res.w_ids:
            assert set(ids.tolist()) <= train_ids
    w1, a1 = snapshot(engine.module)
    assert changed(w0, w1) and changed(a0, a1)


@pytest.mark.parametrize("name", ["bilevel", "two_batch"])
def test_bilevel_alpha_then_w_each_from_its_own_batch(name):
    """Plain SGD: a bilevel step is alpha1 = alpha0 - lr_a * dL_a/dalpha (w0, alpha0) on alpha's batch
    (bilevel: the valid batch; two_batch: the first training batch), then w1 = w0 - lr_w * dL_w/dw
    (w0, alpha1) on the training batch; the updates the swapped batches would give are far off.
    Correct code: rel diff 5e-8 (alpha), 4e-6 (w), tolerance 1e-3. Verified to catch (bilevel):
    Bilevel._alpha_source returning `train` (alpha rel diff 1.03) and the w phase drawing from alpha's
    source (w rel diff 1.49)."""
    engine, strategy, tr, va = make(plain_sgd_cfg(strategy=name, **{"optim.alpha.lr": 0.1}))
    it, vit = iter(tr), iter(va)
    # each iterator holds one spare batch, so a step that drew from the wrong one still runs
    if name == "bilevel":
        bt, ba = next(it), next(vit)
        train, valid = iter([bt, next(it)]), iter([ba, next(vit)])
    else:
        ba, bt = next(it), next(it)
        train, valid = iter([ba, bt, next(it)]), None
    lr_w, lr_a = engine.optimizer.lr("w"), engine.optimizer.lr("alpha")
    dw, da, w0, a0 = _deltas(engine.module, lambda: strategy.step(train, valid))
    _, ga = grads_at(engine.module, ba, w0, a0)
    a1 = [a + d for a, d in zip(a0, da)]
    gw, _ = grads_at(engine.module, bt, w0, a1)
    assert max_rel_diff(da, [-lr_a * g for g in ga]) < 1e-3
    assert max_rel_diff(dw, [-lr_w * g for g in gw]) < 1e-3
    # swapped batches give a different update
    _, ga_t = grads_at(engine.module, bt, w0, a0)
    gw_a, _ = grads_at(engine.module, ba, w0, a1)
    assert max_rel_diff(da, [-lr_a * g for g in ga_t]) > 0.1
    assert max_rel_diff(dw, [-lr_w * g for g in gw_a]) > 0.1


def test_bilevel_phases_step_only_their_group():
    engine, strategy, tr, va = make(tiny_cfg(strategy="bilevel"))
    b = next(iter(tr))
    w0, a0 = snapshot(engine.module)
    engine.backward(torch.nn.functional.cross_entropy(engine.forward(b.x), b.y))
    engine.step(frozenset({"alpha"}))
    w1, a1 = snapshot(engine.module)
    assert not changed(w0, w1) and changed(a0, a1)
    engine.backward(torch.nn.functional.cross_entropy(engine.forward(b.x), b.y))
    engine.step(frozenset({"w"}))
    w2, a2 = snapshot(engine.module)
    assert changed(w1, w2) and not changed(a1, a2)


def test_two_batch_uses_two_different_training_batches():
    engine, strategy, tr, va = make(tiny_cfg(strategy="two_batch"))
    res = strategy.step(iter(tr), None)
    train_ids = set(tr.ids.tolist())
    a, w = set(res.alpha_ids[0].tolist()), set(res.w_ids[0].tolist())
    assert a <= train_ids and w <= train_ids and a.isdisjoint(w)


def test_second_order_refuses_mixed_precision():
    from sdarts.errors import ConfigError
    with pytest.raises(ConfigError, match="fp32"):
        tiny_cfg(strategy="bilevel_second_order", precision="bf16")


def test_nan_loss_stops_before_any_update():
    from sdarts.data import Batch
    from sdarts.errors import NumericalFault
    engine, strategy, tr, _ = make(tiny_cfg(strategy="single_level"))
    b = next(iter(tr))
    bad = Batch(torch.full_like(b.x, float("nan")), b.y, b.ids)
    w0, a0 = snapshot(engine.module)
    with pytest.raises(NumericalFault, match="non-finite loss"):
        strategy.step(iter([bad]), None)
    w1, a1 = snapshot(engine.module)
    assert not changed(w0, w1) and not changed(a0, a1)
