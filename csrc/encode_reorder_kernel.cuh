// One fused pass: int4 nibble encode + CUTLASS W4A8 reorder.
//
// Input: an int4 [N][K] row-major buffer (K/2 bytes a row). Output: the
// buffer cutlass_w4a8_mm reads. The reorder is a byte permutation: every
// 16-row x 16-byte tile (16 n x 32 k) becomes 256 contiguous output bytes,
// tiles N-fastest, then K. Inside a tile, for row r = 8*rh + rl and byte
// c = 8*c3 + 2*c21 + c0:
//   dst = 32*rl + 8*c21 + 4*c3 + 2*rh + c0.
// So each output 32-bit word is two 2-byte pieces: bytes (c, c+1) of row rl
// and the same bytes of row rl + 8; the 32 output bytes of row pair
// (rl, rl+8) are built from the 16 bytes of each of the two rows with eight
// byte permutes.
//
// A block stages a kRows x (16 * kChunks)-byte slab of the input in shared
// memory (fully coalesced 16-byte loads, encoded on the way in). Each warp
// then builds the 1 KiB of output of 4 consecutive tiles (contiguous in the
// output), stages it in shared memory and writes it with 16-byte stores that
// cover 512 contiguous bytes per instruction. K is a multiple of 128, so a
// row is a whole number of 64-byte slabs: no out-of-bounds access for any
// K, N multiple of 128 (K % 256 == 128 included).
//
// Grouped (MoE) weights: blockIdx.y is the expert; expert e's input and
// output both start at byte e * N * K / 2 (64-bit offsets), so every expert
// is prepared exactly as the dense op prepares that matrix alone.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace w4a8_fastprep {

constexpr int kEncodeThreads = 256;

// CUTLASS's nibble encoding of 8 nibbles at once, bit-identical to the
// 256-entry byte table of the reference (each nibble is handled on its own;
// no carry crosses a nibble; the tests compare with the table on every byte
// value). Signed nibble s: 1..7 -> 8 - s, others stay. With kFromUint4b8
// the input nibble u is uint4b8 (s = u ^ 8). Arithmetic instead of a table
// lookup: no shared-memory bank conflicts, ~1.5 instructions a byte.
template <bool kFromUint4b8>
__device__ __forceinline__ uint32_t encode8(uint32_t x) {
  constexpr uint32_t kLow3 = 0x77777777u, kHigh = 0x88888888u;
  // "positive" nibble: s in 1..7, i.e. bit 3 clear and low 3 bits non-zero.
  const uint32_t s = kFromUint4b8 ? (x ^ kHigh) : x;
  const uint32_t low_nonzero = ((s & kLow3) + kLow3) & kHigh;
  const uint32_t positive = low_nonzero & ~s & kHigh;
  const uint32_t mask = (positive >> 3) * 0xFu;  // whole nibbles
  // 8 - s == (-s) ^ 8 for s in 1..7; -s per nibble = (~s) + 1, no carries.
  const uint32_t not_s = ~s;
  const uint32_t neg = ((not_s & kLow3) + 0x11111111u) ^ (not_s & kHigh);
  return ((neg ^ kHigh) & mask) | (s & ~mask);
}

template <bool kFromUint4b8>
__device__ __forceinline__ uint4 encode16(uint4 v) {
  v.x = encode8<kFromUint4b8>(v.x);
  v.y = encode8<kFromUint4b8>(v.y);
  v.z = encode8<kFromUint4b8>(v.z);
  v.w = encode8<kFromUint4b8>(v.w);
  return v;
}

// kRows rows (multiple of 64) x kChunks 16-byte chunks per block.
template <int kRows, int kChunks>
struct EncodeReorderTile {
  static_assert(kRows % 64 == 0, "a warp covers 4 n-tiles = 64 rows");
  static constexpr int kPitch = kChunks * 16 + 16;  // 8 rows: 8 bank groups
  static constexpr int kLoads = kRows * kChunks / kEncodeThreads;
  static constexpr int kWarpTasks = kRows * kChunks / 64;  // 4 tiles, 1 KiB each
  static constexpr int kWarps = kEncodeThreads / 32;
  static_assert(kLoads >= 1 && kRows * kChunks % kEncodeThreads == 0, "");
  static constexpr int kSmemBytes = kRows * kPitch + kWarps * 1024;
};

// Block (b, e) covers rows [rs*kRows, +kRows) and bytes
// [first_col + cs*16*kChunks, +16*kChunks) of every row of expert e,
// rs = b % row_slabs, cs = b / row_slabs.
template <bool kFromUint4b8, int kRows, int kChunks>
__global__ void __launch_bounds__(kEncodeThreads)
    encode_reorder_kernel(const uint8_t* __restrict__ in,
                          uint8_t* __restrict__ out, int64_t n_rows,
                          int64_t row_bytes, int64_t row_slabs,
                          int64_t first_col, int64_t expert_bytes) {
  using T = EncodeReorderTile<kRows, kChunks>;
  __shared__ __align__(16) uint8_t smem[T::kSmemBytes];
  uint8_t* slab = smem;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  uint8_t* stage = smem + kRows * T::kPitch + warp * 1024;

  const int64_t expert_offset = static_cast<int64_t>(blockIdx.y) * expert_bytes;
  in += expert_offset;
  out += expert_offset;
  const int64_t block = blockIdx.x;
  const int64_t rs = block % row_slabs;
  const int64_t col0 = first_col + (block / row_slabs) * (16 * kChunks);
  const uint8_t* src = in + rs * kRows * row_bytes + col0;

  // 1) The slab, coalesced, all loads in flight before the first use.
  uint4 v[T::kLoads];
#pragma unroll
  for (int i = 0; i < T::kLoads; ++i) {
    const int idx = threadIdx.x + i * kEncodeThreads;
    const int r = idx / kChunks, c = idx % kChunks;
    v[i] = __ldcs(reinterpret_cast<const uint4*>(src + r * row_bytes) + c);
  }
#pragma unroll
  for (int i = 0; i < T::kLoads; ++i) {
    const int idx = threadIdx.x + i * kEncodeThreads;
    const int r = idx / kChunks, c = idx % kChunks;
    *reinterpret_cast<uint4*>(slab + r * T::kPitch + c * 16) =
        encode16<kFromUint4b8>(v[i]);
  }
  __syncthreads();

  // 2) Warp task: k-tile kt, n-tiles 4*ng .. 4*ng+3 (1 KiB of output);
  //    lane: n-tile 4*ng + lane/8, row pair (rl, rl + 8), rl = lane % 8.
  const int64_t k_tiles_before = col0 / 16;
  const int64_t n_tile_stride = n_rows / 16;  // output tiles per k-tile
#pragma unroll
  for (int t = warp; t < T::kWarpTasks; t += T::kWarps) {
    const int ng = t % (kRows / 64), kt = t / (kRows / 64);
    const int nt = ng * 4 + (lane >> 3), rl = lane & 7;
    const uint8_t* tile = slab + (nt * 16 + rl) * T::kPitch + kt * 16;
    const uint4 x = *reinterpret_cast<const uint4*>(tile);
    const uint4 y = *reinterpret_cast<const uint4*>(tile + 8 * T::kPitch);
    uint4 o0, o1;
    o0.x = __byte_perm(x.x, y.x, 0x5410); o0.y = __byte_perm(x.z, y.z, 0x5410);
    o0.z = __byte_perm(x.x, y.x, 0x7632); o0.w = __byte_perm(x.z, y.z, 0x7632);
    o1.x = __byte_perm(x.y, y.y, 0x5410); o1.y = __byte_perm(x.w, y.w, 0x5410);
    o1.z = __byte_perm(x.y, y.y, 0x7632); o1.w = __byte_perm(x.w, y.w, 0x7632);
    reinterpret_cast<uint4*>(stage)[2 * lane] = o0;
    reinterpret_cast<uint4*>(stage)[2 * lane + 1] = o1;
    __syncwarp();
    const uint4 s0 = reinterpret_cast<const uint4*>(stage)[lane];
    const uint4 s1 = reinterpret_cast<const uint4*>(stage)[lane + 32];
    __syncwarp();
    const int64_t n_tile0 = rs * (kRows / 16) + ng * 4;
    uint4* dst = reinterpret_cast<uint4*>(
        out + 256 * (n_tile0 + n_tile_stride * (k_tiles_before + kt)));
    __stcs(dst + lane, s0);
    __stcs(dst + lane + 32, s1);
  }
}

// Launch geometry: a block stages kRows rows x 16*kChunks bytes (256 bytes
// of a row for the default 16 chunks). When K/2 is not a multiple of that
// width (K % 512 != 0), the 64..192 bytes left at the end of every row go to
// a second launch with 64-byte slabs (K is a multiple of 128, so a row is a
// whole number of 64-byte slabs). grid.y is the expert (num_experts <=
// 65535, checked by the caller).
constexpr int kWeightRows = 64;
constexpr int kWeightChunks = 16;

template <bool kFromUint4b8, int kRows = kWeightRows, int kChunks = kWeightChunks>
cudaError_t launch_encode_reorder_raw(const uint8_t* in, uint8_t* out,
                                      int64_t n_rows, int64_t k,
                                      cudaStream_t stream,
                                      int64_t num_experts = 1) {
  const int64_t row_bytes = k / 2;
  const int64_t expert_bytes = n_rows * row_bytes;
  const int64_t row_slabs = n_rows / kRows;
  const int64_t width = 16 * kChunks;
  const int64_t main_cols = row_bytes / width;
  if (main_cols > 0) {
    const dim3 grid(static_cast<unsigned>(row_slabs * main_cols),
                    static_cast<unsigned>(num_experts));
    encode_reorder_kernel<kFromUint4b8, kRows, kChunks>
        <<<grid, kEncodeThreads, 0, stream>>>(in, out, n_rows, row_bytes,
                                              row_slabs, 0, expert_bytes);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const int64_t tail_cols = (row_bytes - main_cols * width) / 64;
  if constexpr (kChunks > 4) {
    if (tail_cols > 0) {
      const dim3 grid(static_cast<unsigned>(row_slabs * tail_cols),
                      static_cast<unsigned>(num_experts));
      encode_reorder_kernel<kFromUint4b8, kRows, 4>
          <<<grid, kEncodeThreads, 0, stream>>>(in, out, n_rows, row_bytes,
                                                row_slabs, main_cols * width,
                                                expert_bytes);
      return cudaGetLastError();
    }
  }
  return cudaSuccess;
}

}  // namespace w4a8_fastprep
