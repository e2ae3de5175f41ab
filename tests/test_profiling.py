"""The step profiler (`log.profile_steps`, sdarts/profiling.py): the window covers exactly the steps it
says, its summary sorts kernels into the categories its readers act on, and a search writes it."""
import json

import pytest
import torch

from sdarts.profiling import StepProfiler, category


@pytest.mark.parametrize("name, want", [
    # CUDA kernels as torch 2.x / cuDNN 9 name them
    ("void at::native::(anonymous namespace)::conv_depthwise2d_forward_kernel<3, float, int>", "depthwise conv"),
    ("void cudnn::cnn::conv2d_grouped_direct_kernel<false, true, false, false, 0, 0, int, __nv_bfloat16>",
     "depthwise conv"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x64x64", "conv / gemm"),
    ("sm80_xmma_wgrad_implicit_gemm_indexed_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "conv / gemm"),
    ("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false>",
     "layout transform"),
    ("void at::native::batch_norm_collect_statistics_channels_last_kernel<...>", "batch_norm"),
    ("void at::native::(anonymous namespace)::batch_norm_backward_reduce_channels_last_kernel<4>", "batch_norm"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy_contig<...>", "copy / cat / index"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::AddFunctor<float>, ...>", "elementwise"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<...>>>",
     "reduction"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<...>", "optimizer"),
    ("void at::native::(anonymous namespace)::max_pool_backward_nhwc<c10::BFloat16, float>", "pool"),
    # ATen ops (the CPU profile)
    ("aten::convolution_backward", "conv / gemm"),
    ("aten::native_batch_norm_backward", "batch_norm"),
    ("aten::threshold_backward", "elementwise"),
    ("aten::cat", "copy / cat / index"),
    ("aten::empty", "other"),
])
def test_kernels_fall_in_their_category(name, want):
    assert category(name) == want


def test_window_covers_exactly_the_named_steps(tmp_path):
    """Warm-up 2, window 3, in a run resumed at step 100: steps 103-105 are profiled. Every step does one
    matmul; the steps outside the window also do a conv, which must not appear in the summary."""
    a, x, w = torch.randn(8, 8), torch.randn(1, 2, 8, 8), torch.randn(2, 2, 3, 3)
    prof = StepProfiler(tmp_path / "profile", warmup=2, steps=3, enabled=True, device_type="cpu", rank=0,
                        first_step=100)
    for i in range(8):
        in_window = 2 <= i < 5
        torch.mm(a, a)
        if not in_window:
            torch.conv2d(x, w)
        prof.step_done(images=16)
    s = json.loads((tmp_path / "profile" / "rank0.summary.json").read_text())
    assert s["run_steps"] == [103, 105] and s["steps"] == 3 and s["batch"] == 16
    calls = {t["name"]: t["calls"] for t in s["top"]}
    assert calls.get("aten::mm") == 1.0
    assert not any("conv" in n for n in calls) and "conv / gemm" in s["categories_ms"]  # mm: a gemm
    trace = json.loads((tmp_path / "profile" / "rank0.trace.json").read_text())
    assert sum(e.get("name") == "aten::mm" for e in trace["traceEvents"]) == 3
    assert not torch.autograd.profiler._is_profiler_enabled  # stopped after the window


def test_run_ending_inside_the_window_writes_nothing(tmp_path):
    prof = StepProfiler(tmp_path / "profile", warmup=0, steps=5, enabled=True, device_type="cpu", rank=0)
    prof.step_done(images=4)
    assert torch.autograd.profiler._is_profiler_enabled
    prof.close()
    assert not torch.autograd.profiler._is_profiler_enabled and not (tmp_path / "profile").exists()


def test_off_by_default_and_on_other_ranks(tmp_path):
    for p in (StepProfiler(tmp_path / "a", warmup=0, steps=0, enabled=True, device_type="cpu", rank=0),
              StepProfiler(tmp_path / "b", warmup=0, steps=2, enabled=False, device_type="cpu", rank=1)):
        for _ in range(3):
            p.step_done(images=4)
        p.close()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_search_writes_its_profile(tmp_path):
    """A real search (DeepSpeed engine, CPU) with log.profile_steps: the trace and summary of steps 2-3."""
    from sdarts.search.loop import run_search
    from search_helpers import tiny_cfg
    cfg = tiny_cfg(**{"log.profile_steps": 2, "log.profile_warmup": 1, "epochs": 1})
    run_search(cfg, tmp_path / "run")
    s = json.loads((tmp_path / "run" / "profile" / "rank0.summary.json").read_text())
    assert s["run_steps"] == [2, 3] and s["batch"] == cfg.data.micro_batch
    # the supernet's convolutions, forward and backward, are in the profiled steps
    names = {t["name"] for t in s["top"]}
    assert {"aten::convolution_backward", "aten::mkldnn_convolution"} & names
    assert s["categories_ms"]["conv / gemm"] > 0 and s["calls_per_step"] > 100
    trace = json.loads((tmp_path / "run" / "profile" / "rank0.trace.json").read_text())
    assert any(e.get("name") == "aten::convolution_backward" for e in trace["traceEvents"])


def test_retrain_writes_its_profile(tmp_path):
    """The retrain loop's window: steps 2-3 of a 3-step real CIFAR retrain (DARTS_V2 cell, CPU)."""
    from conftest import need_data
    from retrain.train import run_retrain
    from test_retrain_train import DARTS_V2, tiny
    npz = need_data("cifar10-subset", "cifar10_subset.npz")
    run_retrain(tiny(npz, max_steps=3, **{"log.profile_steps": 2, "log.profile_warmup": 1}), DARTS_V2,
                tmp_path / "run")
    s = json.loads((tmp_path / "run" / "profile" / "rank0.summary.json").read_text())
    assert s["run_steps"] == [2, 3] and s["batch"] == 16
    assert s["categories_ms"]["conv / gemm"] > 0
