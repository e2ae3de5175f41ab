"""CombinedOptimizer follows torch's SGD and Adam rules exactly, steps only the groups named in `updating`, clips w only."""
import pytest
import torch

from sdarts.engine import CombinedOptimizer, cosine_lr


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    w = [torch.nn.Parameter(torch.randn(4, 3, generator=g)), torch.nn.Parameter(torch.randn(5, generator=g))]
    a = [torch.nn.Parameter(torch.randn(6, 5, generator=g))]
    return w, a


def _grads(params, k):
    g = torch.Generator().manual_seed(100 + k)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def test_matches_torch_sgd_and_adam():
    w, a = _params(0)
    w_ref, a_ref = _params(0)
    opt = CombinedOptimizer(w, a, w_lr=0.1, w_momentum=0.9, w_weight_decay=3e-4, w_nesterov=False,
                            alpha_rule="adam", alpha_lr=3e-4, alpha_betas=(0.5, 0.999), alpha_weight_decay=1e-3)
    sgd = torch.optim.SGD(w_ref, lr=0.1, momentum=0.9, weight_decay=3e-4)
    adam = torch.optim.Adam(a_ref, lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
    for k in range(4):
        _grads(w + a, k), _grads(w_ref + a_ref, k)
        opt.step(), sgd.step(), adam.step()
    for p, q in zip(w + a, w_ref + a_ref):
        assert torch.allclose(p, q, atol=1e-7, rtol=1e-6)


def test_alpha_sgd_rule_and_phases():
    w, a = _params(1)
    a_ref = [torch.nn.Parameter(a[0].detach().clone())]
    opt = CombinedOptimizer(w, a, w_lr=0.1, w_momentum=0.9, w_weight_decay=0, w_nesterov=False,
                            alpha_rule="sgd", alpha_lr=0.005, alpha_momentum=0.9, alpha_weight_decay=3e-4)
    ref = torch.optim.SGD(a_ref, lr=0.005, momentum=0.9, weight_decay=3e-4)
    w0 = [p.detach().clone() for p in w]
    for k in range(3):
        _grads(w + a, k), _grads(a_ref, k + 1000)
        a_ref[0].grad = a[0].grad.clone()
        with opt.updating(frozenset({"alpha"})):
            opt.step()
        ref.step()
    assert torch.allclose(a[0], a_ref[0], atol=1e-7)
    assert all(torch.equal(p, q) for p, q in zip(w, w0))  # w group not named: untouched
    # the scope ends with the block: a later step updates both groups again
    opt.step()
    assert not all(torch.equal(p, q) for p, q in zip(w, w0))
    with pytest.raises(ValueError, match="unknown parameter group"):
        with opt.updating(frozenset({"weights"})):
            pass


def test_clipping_applies_to_w_only():
    w, a = _params(2)
    opt = CombinedOptimizer(w, a, w_lr=1.0, w_momentum=0, w_weight_decay=0, w_nesterov=False,
                            alpha_rule="sgd", alpha_lr=1.0, alpha_momentum=0, grad_clip=1.0)
    w0, a0 = [p.detach().clone() for p in w], a[0].detach().clone()
    for p in w:
        p.grad = torch.full_like(p, 10.0)
    a[0].grad = torch.full_like(a[0], 10.0)
    opt.step()
    step_norm = torch.cat([(p0 - p.detach()).flatten() for p, p0 in zip(w, w0)]).norm()
    assert abs(float(step_norm) - 1.0) < 1e-4  # w's update was clipped to norm 1
    assert torch.allclose(a0 - a[0], torch.full_like(a0, 10.0))  # alpha's was not


def test_cosine_schedule_endpoints():
    assert cosine_lr(0.025, 0.001, 0, 50) == 0.025
    assert abs(cosine_lr(0.025, 0.001, 50, 50) - 0.001) < 1e-12
    assert abs(cosine_lr(0.025, 0.001, 25, 50) - 0.013) < 1e-12
