// torch binding of kernels/sar_norm.cu, compiled together with it by torch.utils.cpp_extension on a machine
// with CUDA (knowlip/ops/sar_norm.py builds it on first use and caches it).
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <vector>

#include "sar_norm.cuh"

// x: contiguous CUDA tensor (B, C, H, W) [float32, uint16] or (B, C, H, W, 2) [float32, int16] or complex64.
// out and mask: preallocated (B, C, H, W), float32/bfloat16 and bool.
void sar_norm(torch::Tensor x, int64_t input_kind, torch::Tensor out, torch::Tensor mask, int64_t channels,
              int64_t hw, std::vector<int64_t> kind, std::vector<double> lo, std::vector<double> hi,
              std::vector<double> scale, std::vector<double> offset, std::vector<double> gain, int64_t mode,
              double fill, c10::optional<double> nodata, int64_t unroll,
              int64_t blocks_per_sm) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous(), "sar_norm: x must be a contiguous CUDA tensor");
  TORCH_CHECK(out.is_contiguous() && mask.is_contiguous(), "sar_norm: outputs must be contiguous");
  TORCH_CHECK(channels >= 1 && channels <= KNOWLIP_MAX_CHANNELS, "sar_norm: 1..8 channels supported");
  c10::cuda::CUDAGuard guard(x.device());
  SarNormArgs a{};
  a.n = out.numel();
  a.hw = hw;
  a.channels = static_cast<int>(channels);
  a.mode = static_cast<int>(mode);
  a.fill = static_cast<float>(fill);
  a.has_nodata = nodata.has_value() ? 1 : 0;
  a.nodata = nodata.has_value() ? static_cast<float>(*nodata) : 0.0f;
  for (int c = 0; c < channels; ++c) {
    a.kind[c] = static_cast<int>(kind[c]);
    a.lo[c] = static_cast<float>(lo[c]);
    a.hi[c] = static_cast<float>(hi[c]);
    a.scale[c] = static_cast<float>(scale[c]);
    a.offset[c] = static_cast<float>(offset[c]);
    a.gain[c] = static_cast<float>(gain[c]);
  }
  const SarNormLaunch launch{static_cast<int>(unroll), static_cast<int>(blocks_per_sm)};
  cudaError_t err = knowlip_sar_norm(static_cast<int>(input_kind), x.data_ptr(), out.data_ptr(),
                                     out.scalar_type() == torch::kBFloat16 ? 1 : 0,
                                     reinterpret_cast<uint8_t*>(mask.data_ptr()), &a, &launch,
                                     at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "sar_norm kernel failed: ", cudaGetErrorString(err));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("sar_norm", &sar_norm, "fused SAR log-intensity normalisation"); }
