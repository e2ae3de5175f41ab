"""DARTS second order (`BilevelSecondOrder`): the unrolled alpha gradient against the exact one, and
the step applying it.

The exact reference is computed independently by double backward in float64: w'(alpha) = w - xi *
(momentum * buf + dL_train/dw(w, alpha) + wd * w) built with `create_graph=True`, L_val evaluated at
w' through `torch.func.functional_call`, then differentiated w.r.t. alpha.
"""
import torch
from torch.func import functional_call

from search_helpers import grads_at, make, max_rel_diff, plain_sgd_cfg, snapshot, tiny_cfg
from sdarts.data import Batch

XI, MOMENTUM, WD = 0.1, 0.9, 0.05


def _cat(xs) -> torch.Tensor:
    return torch.cat([x.flatten() for x in xs])


def _exact_unrolled(model, optimizer, bt: Batch, bv: Batch, second_order: bool = True) -> torch.Tensor:
    """d/dalpha L_val(w'(alpha), alpha) by double backward (`second_order=False`: w' held fixed, i.e.
    only the first-order part dL_val/dalpha at w')."""
    weights, alphas = model.get_weights(), model.get_alphas()
    names = {id(p): n for n, p in model.named_parameters()}
    w0 = [w.detach().clone().requires_grad_() for w in weights]
    a0 = [a.detach().clone().requires_grad_() for a in alphas]

    def loss(ws, b):
        params = {names[id(p)]: t for p, t in zip(weights + alphas, ws + a0)}
        return torch.nn.functional.cross_entropy(functional_call(model, params, (b.x,)), b.y)

    gw = torch.autograd.grad(loss(w0, bt), w0, create_graph=second_order, allow_unused=True)
    w1 = [w - XI * (MOMENTUM * optimizer.state[p]["momentum_buffer"] + (0 if g is None else g) + WD * w)
          for p, w, g in zip(weights, w0, gw)]
    if not second_order:
        w1 = [w.detach() for w in w1]
    ga = torch.autograd.grad(loss(w1, bv), a0, allow_unused=True)
    return _cat([torch.zeros_like(a) if g is None else g for a, g in zip(a0, ga)])


def test_unrolled_alpha_grad_matches_exact_double_backward():
    """`unrolled_alpha_grad` equals the exact unrolled gradient (float64 double backward) at a real
    learning rate (xi 0.1), with non-zero momentum buffers and weight decay, where the second-order part
    is ~62% of the first-order part (asserted > 20%).

    eps: the tiny net is ReLU, so the finite difference of dL_train/dalpha jumps wherever w +- eps*v
    crosses a ReLU kink, and the error then grows as 1/eps (measured: at the default unrolled_eps 0.01
    the result is off by ~3x the gradient's norm; at 1e-5 and 1e-6 one configuration tried was off by
    1e2 and 1e3x, at 1e-7 and 1e-8 by ~1e-8). Here, in float64 at eps 1e-8, the correct code is off by
    4e-8 relative: the tolerance (1e-5) has a 250x margin, and every mutation below is off by 0.03 or more.
    The finite-difference formula itself is not reimplemented here: the real method runs, in float64.

    Verified (by mutating `sdarts/search/strategies.py`, then restoring it) to catch:
    - the sign of the second-order term flipped (`da + xi * (p - m) / (2 * eps)`): rel err 1.55
    - the second-order term dropped (`da + 0 * (p - m) / (2 * eps)`): rel err 0.71
    - the momentum term dropped from w' (`d = d + 0 * mom * buf`): rel err 0.68
    - the weight-decay term dropped from w' (`d = g + 0 * wd * w`): rel err 0.030
    """
    cfg = tiny_cfg(strategy="bilevel_second_order", unrolled_eps=1e-8,
                   **{"optim.w.lr": XI, "optim.w.momentum": MOMENTUM, "optim.w.weight_decay": WD,
                      "optim.w.schedule": "constant"})
    engine, strategy, tr, va = make(cfg)
    it, vit = iter(tr), va.cycle()
    for _ in range(2):  # real steps (fp32, through DeepSpeed) fill the momentum buffers
        strategy.step(it, vit)
    bt, bv = next(it), next(vit)
    model, optimizer = engine.module, engine.optimizer
    weights = model.get_weights()
    assert all("momentum_buffer" in optimizer.state[w] for w in weights)
    # float64 in place: the same Parameter objects, so the optimizer's state still finds them
    model.double()
    for w in weights:
        optimizer.state[w]["momentum_buffer"] = optimizer.state[w]["momentum_buffer"].double()
    assert optimizer.lr("w") == XI and all(w.dtype == torch.float64 for w in model.get_weights())
    bt, bv = Batch(bt.x.double(), bt.y, bt.ids), Batch(bv.x.double(), bv.y, bv.ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    got = _cat(strategy.unrolled_alpha_grad(bt, bv))
    # it leaves the parameters as they were (BN running statistics move; train-mode BN ignores them)
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state if "running" not in k and "num_batches" not in k)
    model.load_state_dict(state)
    exact = _exact_unrolled(model, optimizer, bt, bv)
    model.load_state_dict(state)
    first = _exact_unrolled(model, optimizer, bt, bv, second_order=False)

    # the second-order part is far from negligible at this lr
    assert (exact - first).norm() > 0.2 * first.norm()
    rel = float((got - exact).norm() / exact.norm())
    assert rel < 1e-5, f"unrolled alpha gradient off the exact one by {rel:.3g} (relative)"


def test_second_order_step_applies_the_unrolled_gradient():
    """One `step`: alpha moves by -lr_a * unrolled_alpha_grad(bt, bv) (the surrogate loss carries it
    through DeepSpeed), then w by -lr_w * dL_train/dw on the training batch at (w0, alpha1) (plain SGD
    on both groups). Correct code: rel diff 5e-8 (alpha), 4e-6 (w), tolerance 1e-3. Verified to catch:
    the surrogate loss's sign flipped (alpha rel diff 2.0) and the w phase run on the valid batch (w rel
    diff 1.23)."""
    engine, strategy, tr, va = make(plain_sgd_cfg(strategy="bilevel_second_order", **{"optim.alpha.lr": 0.1}))
    it, vit = iter(tr), iter(va)
    bt, bv = next(it), next(vit)
    lr_w, lr_a = engine.optimizer.lr("w"), engine.optimizer.lr("alpha")
    w0, a0 = snapshot(engine.module)
    g_alpha = [g.detach().clone() for g in strategy.unrolled_alpha_grad(bt, bv)]
    assert all(torch.equal(w, x) for w, x in zip(w0, snapshot(engine.module)[0]))
    strategy.step(iter([bt, next(it)]), iter([bv, next(vit)]))  # one spare batch each
    w1, a1 = snapshot(engine.module)
    da, dw = [x - y for x, y in zip(a1, a0)], [x - y for x, y in zip(w1, w0)]
    assert max_rel_diff(da, [-lr_a * g for g in g_alpha]) < 1e-3
    gw, _ = grads_at(engine.module, bt, w0, a1)
    assert max_rel_diff(dw, [-lr_w * g for g in gw]) < 1e-3
    gw_v, _ = grads_at(engine.module, bv, w0, a1)
    assert max_rel_diff(dw, [-lr_w * g for g in gw_v]) > 0.1
