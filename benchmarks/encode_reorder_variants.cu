// Tuning harness for the fused encode + reorder kernel: launch geometries of
// csrc/encode_reorder_kernel.cuh against a device-to-device copy of the same
// bytes, each checked byte for byte against the first one. No torch needed.
// Shapes (N K pairs) come on the command line, from the shape table
// (vllm_w4a8_fastprep/tools/model_shapes.py): its large dense layers and a
// K % 256 == 128 shard (the tail launch), printed by
//   python3 -c "from vllm_w4a8_fastprep.tools.model_shapes import DENSE_LARGE as L, DENSE as D; print(*(f'{n} {k}' for n, k in [*L.values(), D['llama2-7b/down@tp2']]))"
// Build and run (from the repository root):
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Icsrc benchmarks/encode_reorder_variants.cu -o /tmp/variants
//   /tmp/variants $(python3 -c "...as above...")
#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "encode_reorder_kernel.cuh"

using namespace w4a8_fastprep;

#define CK(...)                                                     \
  do {                                                              \
    cudaError_t e_ = (__VA_ARGS__);                                 \
    if (e_ != cudaSuccess) {                                        \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), \
                  __FILE__, __LINE__);                              \
      std::exit(1);                                                 \
    }                                                               \
  } while (0)

__global__ void fill_random(uint32_t* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    uint32_t x = uint32_t(i) * 2654435761u ^ seed ^ uint32_t(i >> 32) * 40503u;
    x ^= x >> 15; x *= 0x2c1b3c6du; x ^= x >> 12; x *= 0x297a2d39u; x ^= x >> 15;
    p[i] = x;
  }
}

__global__ void count_diff(const uint4* a, const uint4* b, size_t n,
                           unsigned long long* bad) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    uint4 x = a[i], y = b[i];
    if (x.x != y.x || x.y != y.y || x.z != y.z || x.w != y.w) atomicAdd(bad, 1ull);
  }
}

template <typename F>
float median_ms(F&& f, int nbuf) {
  cudaEvent_t s, e;
  CK(cudaEventCreate(&s)); CK(cudaEventCreate(&e));
  for (int i = 0; i < 5; ++i) f(i % nbuf);
  std::vector<float> t;
  for (int i = 0; i < 40; ++i) {
    CK(cudaEventRecord(s));
    f(i % nbuf);
    CK(cudaEventRecord(e));
    CK(cudaEventSynchronize(e));
    float ms; CK(cudaEventElapsedTime(&ms, s, e)); t.push_back(ms);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// N K pairs from argv; every value a positive multiple of 128.
static bool parse_shapes(int argc, char** argv, std::vector<std::array<long long, 2>>& shapes) {
  if (argc < 3 || (argc - 1) % 2) return false;
  for (int i = 1; i < argc; i += 2) {
    std::array<long long, 2> sh{};
    for (int j = 0; j < 2; ++j) {
      char* end = nullptr;
      sh[j] = std::strtoll(argv[i + j], &end, 10);
      if (end == argv[i + j] || *end != '\0' || sh[j] <= 0 || sh[j] % 128) return false;
    }
    shapes.push_back(sh);
  }
  return true;
}

int main(int argc, char** argv) {
  std::vector<std::array<long long, 2>> shapes;
  if (!parse_shapes(argc, argv, shapes)) {
    std::fprintf(stderr,
                 "usage: %s N K [N K ...]   (N, K positive multiples of 128)\n"
                 "  shapes from the table: %s $(python3 -c \"from vllm_w4a8_fastprep.tools.model_shapes "
                 "import DENSE_LARGE as S; print(*(f'{n} {k}' for n, k in S.values()))\")\n",
                 argv[0], argv[0]);
    return 2;
  }
  unsigned long long* bad; CK(cudaMalloc(&bad, 8));
  std::printf("%-12s %-10s %9s %9s %8s %s\n", "N x K", "rows x B", "us", "GB/s",
              "vs copy", "mismatched 16B");
  for (auto& sh : shapes) {
    const long long n = sh[0], k = sh[1];
    const size_t bytes = size_t(n) * k / 2;
    const int nbuf = int(std::max<size_t>(2, std::min<size_t>(6, (size_t(1) << 30) / bytes)));
    std::vector<uint8_t*> in(nbuf);
    for (int i = 0; i < nbuf; ++i) {
      CK(cudaMalloc(&in[i], bytes));
      fill_random<<<1024, 256>>>(reinterpret_cast<uint32_t*>(in[i]), bytes / 4, 1234u + i);
    }
    uint8_t *ref, *out;
    CK(cudaMalloc(&ref, bytes)); CK(cudaMalloc(&out, bytes));
    CK(launch_encode_reorder_raw<true, 128, 4>(in[0], ref, n, k, 0));
    const float copy = median_ms([&](int i) {
      CK(cudaMemcpyAsync(out, in[i], bytes, cudaMemcpyDeviceToDevice)); }, nbuf);
    std::printf("%5lldx%-6lld %-10s %9.1f %9.0f %7.0f%%\n", n, k, "D2D copy", copy * 1e3,
                2 * bytes / copy / 1e6, 100.0);
    auto run = [&](const char* name, auto launch) {
      CK(cudaMemset(out, 0x5A, bytes));
      CK(launch(in[0]));
      CK(cudaMemset(bad, 0, 8));
      count_diff<<<1024, 256>>>(reinterpret_cast<uint4*>(ref), reinterpret_cast<uint4*>(out),
                                bytes / 16, bad);
      unsigned long long nbad; CK(cudaMemcpy(&nbad, bad, 8, cudaMemcpyDeviceToHost));
      const float ms = median_ms([&](int i) { CK(launch(in[i])); }, nbuf);
      std::printf("%5lldx%-6lld %-10s %9.1f %9.0f %7.0f%% %llu\n", n, k, name, ms * 1e3,
                  2 * bytes / ms / 1e6, 100 * copy / ms, nbad);
    };
    run("128x64", [&](uint8_t* p) { return launch_encode_reorder_raw<true, 128, 4>(p, out, n, k, 0); });
    run("64x128", [&](uint8_t* p) { return launch_encode_reorder_raw<true, 64, 8>(p, out, n, k, 0); });
    run("128x128", [&](uint8_t* p) { return launch_encode_reorder_raw<true, 128, 8>(p, out, n, k, 0); });
    run("64x256", [&](uint8_t* p) { return launch_encode_reorder_raw<true, 64, 16>(p, out, n, k, 0); });
    run("128x256", [&](uint8_t* p) { return launch_encode_reorder_raw<true, 128, 16>(p, out, n, k, 0); });
    for (auto p : in) CK(cudaFree(p));
    CK(cudaFree(ref)); CK(cudaFree(out));
  }
  return 0;
}
