"""benchmarks/step_profile.py sorts the kernels of a GPU step into the categories its report is read by
(the one-shot GPU call has no second chance to look at raw names)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from step_profile import category  # noqa: E402


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
