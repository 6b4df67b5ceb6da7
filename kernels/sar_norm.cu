// Fused SAR log-intensity normalisation: raw chip -> normalised value + validity mask, in one pass.
//
// Pure CUDA (no torch headers) so that it compiles anywhere nvcc does; the torch binding is
// sar_norm_binding.cpp. Semantics are those of knowlip.ops.sar_norm.reference (the oracle):
//   intensity I from the raw value (by input type and per-channel product kind),
//   valid = finite, not nodata, I > 0 (dB input: finite and not nodata; complex: nodata when both parts are),
//   dB = 10 log10 I, clipped to [lo, hi] per channel,
//   out = (dB - lo) / (hi - lo)                    (mode 0, "scale")
//       = (dB - mean) / std                        (mode 1, "standardise")
//   invalid -> fill, mask = 0.
// One read of the input and one write of the output and mask: 16-byte vector loads, one block per tile of one
// channel plane, nothing in between. A vector never straddles two channels
// (the launcher checks H*W % VEC == 0 and alignment, else it runs the same kernel with VEC = 1).

#include <cuda_bf16.h>

#include <type_traits>

#include "sar_norm.cuh"

#define KNOWLIP_HD __host__ __device__ __forceinline__

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// dB and validity of one raw element, per input type.
KNOWLIP_HD float db_of(float x, int kind, float, const SarNormArgs& a, bool& valid) {
  valid = isfinite(x) && !(a.has_nodata && x == a.nodata);
  if (kind == P_DB) return x;
  valid = valid && x > 0.0f;
  float l = log10f(x);
  return kind == P_AMPLITUDE ? 20.0f * l : 10.0f * l;
}

KNOWLIP_HD bool complex_nodata(float re, float im, const SarNormArgs& a) {
  return a.has_nodata && re == a.nodata && im == a.nodata;
}

KNOWLIP_HD float db_of(float2 z, int, float, const SarNormArgs& a, bool& valid) {
  float i = z.x * z.x + z.y * z.y;
  valid = isfinite(i) && i > 0.0f && !complex_nodata(z.x, z.y, a);
  return 10.0f * log10f(i);
}

KNOWLIP_HD float db_of(short2 z, int, float, const SarNormArgs& a, bool& valid) {
  float re = static_cast<float>(z.x), im = static_cast<float>(z.y);
  float i = re * re + im * im;
  valid = i > 0.0f && !complex_nodata(re, im, a);
  return 10.0f * log10f(i);
}

KNOWLIP_HD float db_of(unsigned short d, int, float gain, const SarNormArgs& a, bool& valid) {
  float f = static_cast<float>(d);
  float i = gain * f * f;
  valid = isfinite(i) && i > 0.0f && !(a.has_nodata && f == a.nodata);
  return 10.0f * log10f(i);
}

KNOWLIP_HD void store(float* p, float v) { *p = v; }
KNOWLIP_HD void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

template <typename In, int VEC>
KNOWLIP_HD Vec<In, VEC> load_vector(const In* __restrict__ in, long long v) {
  return *reinterpret_cast<const Vec<In, VEC>*>(in + v * VEC);
}

// One loaded vector of VEC elements (vector number v, of channel c): the whole per-element computation.
template <typename In, typename Out, int VEC>
KNOWLIP_HD void normalise_loaded(const Vec<In, VEC>& x, Out* __restrict__ out, uint8_t* __restrict__ mask,
                                 const SarNormArgs& a, int c, long long v) {
  const long long i0 = v * VEC;
  const int kind = a.kind[c];
  const float lo = a.lo[c], hi = a.hi[c], scale = a.scale[c], offset = a.offset[c], gain = a.gain[c];
  Vec<Out, VEC> y;
  Vec<uint8_t, VEC> m;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    bool valid;
    float db = db_of(x.v[k], kind, gain, a, valid);
    float r = (fminf(fmaxf(db, lo), hi) - offset) * scale;
    store(&y.v[k], valid ? r : a.fill);
    m.v[k] = valid ? 1 : 0;
  }
  *reinterpret_cast<Vec<Out, VEC>*>(out + i0) = y;
  *reinterpret_cast<Vec<uint8_t, VEC>*>(mask + i0) = m;
}

// The work is cut into tiles of threads x UNROLL vectors that never leave one channel plane, so the channel (and
// its parameters) is found once per tile, not by a 64-bit division per vector as in the first GPU runs.
struct Tiling {
  long long plane_vecs;      // vectors per channel plane
  long long tiles_per_plane;
  long long tiles;
};

KNOWLIP_HD Tiling tiling(const SarNormArgs& a, int vec, int tile_vecs) {
  Tiling t;
  t.plane_vecs = a.hw / vec;
  t.tiles_per_plane = (t.plane_vecs + tile_vecs - 1) / tile_vecs;
  t.tiles = (a.n / a.hw) * t.tiles_per_plane;
  return t;
}

// One thread's share of one tile: vectors thread, thread + threads, ... (coalesced across the block), all
// UNROLL loads issued before any maths so that each thread keeps UNROLL x 16 bytes in flight. Shared by the
// GPU kernel and the host harness the CPU tests compile (tests/kernel_host_harness.cu).
template <typename In, typename Out, int VEC, int UNROLL>
KNOWLIP_HD void normalise_tile(const In* __restrict__ in, Out* __restrict__ out, uint8_t* __restrict__ mask,
                               const SarNormArgs& a, const Tiling& t, long long tile, int thread, int threads) {
  const long long plane = tile / t.tiles_per_plane;
  const int c = static_cast<int>(plane % a.channels);
  const long long end = (plane + 1) * t.plane_vecs;
  const long long first = plane * t.plane_vecs + (tile - plane * t.tiles_per_plane) * threads * UNROLL + thread;
  Vec<In, VEC> x[UNROLL];
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    if (first + u * threads < end) x[u] = load_vector<In, VEC>(in, first + u * threads);
  }
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    if (first + u * threads < end) normalise_loaded<In, Out, VEC>(x[u], out, mask, a, c, first + u * threads);
  }
}

constexpr int THREADS = 256;
constexpr int DEFAULT_UNROLL = 2;  // H100 sweep: 2 best or within 2% of best at 64 and 256 MB

template <typename In, typename Out, int VEC, int UNROLL>
__global__ void __launch_bounds__(THREADS) sar_norm_kernel(const In* __restrict__ in, Out* __restrict__ out,
                                                           uint8_t* __restrict__ mask, const SarNormArgs a,
                                                           const Tiling t) {
  for (long long tile = blockIdx.x; tile < t.tiles; tile += gridDim.x) {
    normalise_tile<In, Out, VEC, UNROLL>(in, out, mask, a, t, tile, threadIdx.x, THREADS);
  }
}

// Whether the vector path may run: whole vectors inside one channel plane, every pointer aligned for its width.
template <typename Out, int VEC>
KNOWLIP_HD bool vector_path_ok(const void* in, const void* out, const void* mask, const SarNormArgs& a) {
  return (a.hw % VEC == 0) && (reinterpret_cast<uintptr_t>(in) % 16 == 0) &&
         (reinterpret_cast<uintptr_t>(out) % (sizeof(Out) * VEC) == 0) &&
         (reinterpret_cast<uintptr_t>(mask) % VEC == 0);
}

namespace {

int sm_count() {
  static int count = 0;
  if (count == 0) {
    int dev = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev);
    if (count <= 0) count = 1;
  }
  return count;
}

// Blocks: one per tile (measured on an H100: 0.93-1.01 x copy bandwidth at 64-256 MB, against 0.77-0.85 for one
// resident wave of blocks looping over the tiles); blocks_per_sm > 0 caps the grid at that many per SM (tuning).
template <typename In, typename Out, int VEC, int UNROLL>
cudaError_t launch(const void* in, void* out, uint8_t* mask, const SarNormArgs& a, int blocks_per_sm,
                   cudaStream_t stream) {
  const Tiling t = tiling(a, VEC, THREADS * UNROLL);
  long long blocks = t.tiles > 0 ? t.tiles : 1;
  if (blocks_per_sm > 0 && blocks > static_cast<long long>(sm_count()) * blocks_per_sm) {
    blocks = static_cast<long long>(sm_count()) * blocks_per_sm;
  }
  if (blocks > 0x7fffffffLL) blocks = 0x7fffffffLL;  // the tile loop covers the rest
  sar_norm_kernel<In, Out, VEC, UNROLL><<<static_cast<unsigned>(blocks), THREADS, 0, stream>>>(
      static_cast<const In*>(in), static_cast<Out*>(out), mask, a, t);
  return cudaGetLastError();
}

// Float input (the common case, and the one the bandwidth target is measured on) may take another unroll depth
// for tuning (bench/kernels.py --tune); every other layout runs the default.
template <typename In, typename Out, int VEC>
cudaError_t launch_unrolled(const void* in, void* out, uint8_t* mask, const SarNormArgs& a, const SarNormLaunch& l,
                            cudaStream_t s) {
  if constexpr (VEC > 1 && std::is_same_v<In, float>) {
    switch (l.unroll) {
      case 1: return launch<In, Out, VEC, 1>(in, out, mask, a, l.blocks_per_sm, s);
      case 4: return launch<In, Out, VEC, 4>(in, out, mask, a, l.blocks_per_sm, s);
      case 8: return launch<In, Out, VEC, 8>(in, out, mask, a, l.blocks_per_sm, s);
      default: break;
    }
  }
  return launch<In, Out, VEC, DEFAULT_UNROLL>(in, out, mask, a, l.blocks_per_sm, s);
}

template <typename In, typename Out, int VEC>
cudaError_t dispatch_vec(const void* in, void* out, uint8_t* mask, const SarNormArgs& a, const SarNormLaunch& l,
                         cudaStream_t s) {
  return vector_path_ok<Out, VEC>(in, out, mask, a) ? launch_unrolled<In, Out, VEC>(in, out, mask, a, l, s)
                                                    : launch<In, Out, 1, DEFAULT_UNROLL>(in, out, mask, a, 0, s);
}

template <typename Out>
cudaError_t dispatch_input(int input_kind, const void* in, void* out, uint8_t* mask, const SarNormArgs& a,
                           const SarNormLaunch& l, cudaStream_t s) {
  switch (input_kind) {
    case IN_FLOAT: return dispatch_vec<float, Out, 4>(in, out, mask, a, l, s);
    case IN_COMPLEX_FLOAT: return dispatch_vec<float2, Out, 2>(in, out, mask, a, l, s);
    case IN_COMPLEX_INT16: return dispatch_vec<short2, Out, 4>(in, out, mask, a, l, s);
    case IN_UINT16: return dispatch_vec<unsigned short, Out, 8>(in, out, mask, a, l, s);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

extern "C" cudaError_t knowlip_sar_norm(int input_kind, const void* in, void* out, int out_bf16, uint8_t* mask,
                                        const SarNormArgs* args, const SarNormLaunch* launch, cudaStream_t stream) {
  if (args->n == 0) return cudaSuccess;
  if (args->channels < 1 || args->channels > KNOWLIP_MAX_CHANNELS || args->hw < 1 || args->n % args->hw != 0)
    return cudaErrorInvalidValue;
  const SarNormLaunch l = launch ? *launch : SarNormLaunch{0, 0};
  return out_bf16 ? dispatch_input<__nv_bfloat16>(input_kind, in, out, mask, *args, l, stream)
                  : dispatch_input<float>(input_kind, in, out, mask, *args, l, stream);
}
