// Runs the kernel's per-thread code (normalise_tile, shared with the GPU kernel) on the CPU: every thread of
// every tile, with the kernel's tiling and block size, choosing the vector or scalar path as the launcher does. Used by
// tests/test_kernel_host.py to check the CUDA source's maths against the torch reference without a GPU.
//
// usage: harness ARGS.bin INPUT_KIND OUT_BF16 FORCE_SCALAR IN.bin OUT.bin MASK.bin
#include "../kernels/sar_norm.cu"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

template <typename In, typename Out, int VEC>
static void run_all(const void* in, void* out, uint8_t* mask, const SarNormArgs& a) {
  const Tiling t = tiling(a, VEC, THREADS * DEFAULT_UNROLL);
  for (long long tile = 0; tile < t.tiles; ++tile) {
    for (int thread = 0; thread < THREADS; ++thread) {
      normalise_tile<In, Out, VEC, DEFAULT_UNROLL>(static_cast<const In*>(in), static_cast<Out*>(out), mask, a, t,
                                                    tile, thread, THREADS);
    }
  }
}

template <typename In, typename Out, int VEC>
static const char* dispatch(const void* in, void* out, uint8_t* mask, const SarNormArgs& a, bool force_scalar) {
  if (!force_scalar && vector_path_ok<Out, VEC>(in, out, mask, a)) {
    run_all<In, Out, VEC>(in, out, mask, a);
    return "vector";
  }
  run_all<In, Out, 1>(in, out, mask, a);
  return "scalar";
}

template <typename Out>
static const char* by_input(int kind, const void* in, void* out, uint8_t* mask, const SarNormArgs& a, bool scalar) {
  switch (kind) {
    case IN_FLOAT: return dispatch<float, Out, 4>(in, out, mask, a, scalar);
    case IN_COMPLEX_FLOAT: return dispatch<float2, Out, 2>(in, out, mask, a, scalar);
    case IN_COMPLEX_INT16: return dispatch<short2, Out, 4>(in, out, mask, a, scalar);
    case IN_UINT16: return dispatch<unsigned short, Out, 8>(in, out, mask, a, scalar);
  }
  return nullptr;
}

static std::vector<char> read_file(const char* path) {
  FILE* f = std::fopen(path, "rb");
  if (!f) { std::perror(path); std::exit(2); }
  std::fseek(f, 0, SEEK_END);
  long size = std::ftell(f);
  std::fseek(f, 0, SEEK_SET);
  std::vector<char> data(size);
  if (size && std::fread(data.data(), 1, size, f) != static_cast<size_t>(size)) { std::exit(2); }
  std::fclose(f);
  return data;
}

static void write_file(const char* path, const void* data, size_t size) {
  FILE* f = std::fopen(path, "wb");
  if (!f || std::fwrite(data, 1, size, f) != size) { std::perror(path); std::exit(2); }
  std::fclose(f);
}

int main(int argc, char** argv) {
  if (argc != 8) { std::fprintf(stderr, "usage: %s ARGS KIND BF16 SCALAR IN OUT MASK\n", argv[0]); return 2; }
  std::vector<char> raw_args = read_file(argv[1]);
  if (raw_args.size() != sizeof(SarNormArgs)) {
    std::fprintf(stderr, "args file has %zu bytes, SarNormArgs has %zu\n", raw_args.size(), sizeof(SarNormArgs));
    return 2;
  }
  SarNormArgs a;
  std::memcpy(&a, raw_args.data(), sizeof a);
  int kind = std::atoi(argv[2]), bf16 = std::atoi(argv[3]), scalar = std::atoi(argv[4]);
  std::vector<char> input = read_file(argv[5]);
  size_t out_bytes = a.n * (bf16 ? 2 : 4);
  // 64-byte aligned buffers, like a device allocation
  void* in = std::aligned_alloc(64, (input.size() + 63) / 64 * 64);
  void* out = std::aligned_alloc(64, (out_bytes + 63) / 64 * 64);
  uint8_t* mask = static_cast<uint8_t*>(std::aligned_alloc(64, (a.n + 63) / 64 * 64));
  std::memcpy(in, input.data(), input.size());
  std::memset(out, 0xff, out_bytes);  // NaN in both output dtypes: an element no thread wrote shows
  std::memset(mask, 2, a.n);
  const char* path = bf16 ? by_input<__nv_bfloat16>(kind, in, out, mask, a, scalar)
                          : by_input<float>(kind, in, out, mask, a, scalar);
  if (!path) { std::fprintf(stderr, "bad input kind %d\n", kind); return 2; }
  write_file(argv[6], out, out_bytes);
  write_file(argv[7], mask, a.n);
  std::printf("%s\n", path);
  return 0;
}
