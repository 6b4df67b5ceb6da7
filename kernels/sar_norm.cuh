// Shared between the kernel (sar_norm.cu) and its torch binding (sar_norm_binding.cpp): the launch arguments
// and the C entry point. Plain C++ and the CUDA runtime only, so both compilers can read it.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#define KNOWLIP_MAX_CHANNELS 8

enum InputKind { IN_FLOAT = 0, IN_COMPLEX_FLOAT = 1, IN_COMPLEX_INT16 = 2, IN_UINT16 = 3 };
enum ProductKind { P_INTENSITY = 0, P_AMPLITUDE = 1, P_DB = 2, P_COMPLEX = 3, P_DN = 4 };

struct SarNormArgs {
  long long n;   // elements (complex pairs count once)
  long long hw;  // elements per channel plane
  int channels;
  int mode;      // 0 scale, 1 standardise
  float fill;
  float nodata;
  int has_nodata;
  int kind[KNOWLIP_MAX_CHANNELS];
  float lo[KNOWLIP_MAX_CHANNELS];
  float hi[KNOWLIP_MAX_CHANNELS];
  float scale[KNOWLIP_MAX_CHANNELS];   // 1/(hi-lo) or 1/std
  float offset[KNOWLIP_MAX_CHANNELS];  // lo or mean
  float gain[KNOWLIP_MAX_CHANNELS];    // uint16 DN: I = gain * dn^2
};

// How to launch (for tuning; 0 = the default): vectors in flight per thread, blocks per SM (default: one block
// per tile, no cap).
struct SarNormLaunch {
  int unroll;
  int blocks_per_sm;
};

// launch may be null (defaults).
extern "C" cudaError_t knowlip_sar_norm(int input_kind, const void* in, void* out, int out_bf16, uint8_t* mask,
                                        const SarNormArgs* args, const SarNormLaunch* launch, cudaStream_t stream);
