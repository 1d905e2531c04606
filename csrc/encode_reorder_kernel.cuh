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
// A block stages a 128-row x 64-byte slab (8 x 4 tiles) in shared memory with
// fully coalesced 16-byte loads and writes 4 KiB of output as 1 KiB runs
// with 16-byte stores. K is a multiple of 128, so a row always holds a whole
// number of 64-byte slabs: no tail, no out-of-bounds access for any K, N
// multiple of 128 (also K % 256 == 128).
#pragma once

#include <cstdint>

namespace w4a8_fastprep {

constexpr int kSlabRows = 128;   // rows of a block's slab (8 n-tiles)
constexpr int kSlabBytes = 64;   // bytes of a row in a slab (4 k-tiles)
constexpr int kSlabPitch = 80;   // smem row pitch: 8 rows hit 8 bank groups
constexpr int kEncodeThreads = 256;

// CUTLASS's nibble encoding of 8 nibbles at once, bit-identical to the
// 256-entry byte table of the reference (each nibble is handled on its own;
// no carry crosses a nibble). Signed nibble s: 1..7 -> 8 - s, others stay.
// With kFromUint4b8, the input nibble u is uint4b8 (s = u ^ 8) and the
// result is enc(u ^ 8): u in 9..15 -> 16 - u, others -> u ^ 8.
template <bool kFromUint4b8>
__device__ __forceinline__ uint32_t encode8(uint32_t x) {
  constexpr uint32_t kLow3 = 0x77777777u, kHigh = 0x88888888u;
  // s = signed nibble; "positive" means s in 1..7: bit 3 clear, low 3 != 0.
  const uint32_t s = kFromUint4b8 ? (x ^ kHigh) : x;
  const uint32_t low_nonzero = ((s & kLow3) + kLow3) & kHigh;  // per nibble
  const uint32_t positive = low_nonzero & ~s & kHigh;
  const uint32_t mask = (positive >> 3) * 0xFu;  // whole nibbles
  // 8 - s == (-s) ^ 8 for s in 1..7; -s per nibble = (~s) + 1 without carries.
  const uint32_t not_s = ~s;
  const uint32_t neg = ((not_s & kLow3) + 0x11111111u) ^ (not_s & kHigh);
  return ((neg ^ kHigh) & mask) | (s & ~mask);
}

__device__ __forceinline__ uint4 encode16(uint4 v, bool from_uint4b8) {
  if (from_uint4b8) {
    v.x = encode8<true>(v.x); v.y = encode8<true>(v.y);
    v.z = encode8<true>(v.z); v.w = encode8<true>(v.w);
  } else {
    v.x = encode8<false>(v.x); v.y = encode8<false>(v.y);
    v.z = encode8<false>(v.z); v.w = encode8<false>(v.w);
  }
  return v;
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t s) {
  return __byte_perm(a, b, s);
}

template <bool kFromUint4b8>
__global__ void __launch_bounds__(kEncodeThreads)
    encode_reorder_kernel(const uint8_t* __restrict__ in,
                          uint8_t* __restrict__ out, int64_t n_rows,
                          int64_t row_bytes, int64_t row_slabs) {
  __shared__ __align__(16) uint8_t slab[kSlabRows * kSlabPitch];

  const int64_t block = blockIdx.x;
  const int64_t rs = block % row_slabs;  // which 128 rows
  const int64_t cs = block / row_slabs;  // which 64 bytes of each row
  const uint8_t* src = in + rs * kSlabRows * row_bytes + cs * kSlabBytes;

  // 1) 128 rows x 4 x 16 B, coalesced, encoded on the way in.
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int idx = threadIdx.x + i * kEncodeThreads;
    const int r = idx >> 2, c = idx & 3;
    uint4 v = __ldcs(reinterpret_cast<const uint4*>(src + r * row_bytes) + c);
    v = encode16(v, kFromUint4b8);
    *reinterpret_cast<uint4*>(slab + r * kSlabPitch + c * 16) = v;
  }
  __syncthreads();

  // 2) Warp w: k-tile w/2, n-tiles 4*(w%2) .. +3; lane: n-tile lane/8, row
  // pair (rl, rl+8) with rl = lane%8. The warp writes 1 KiB contiguous.
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int kt = warp >> 1;
  const int nt = (warp & 1) * 4 + (lane >> 3);
  const int rl = lane & 7;
  const uint8_t* tile = slab + (nt * 16 + rl) * kSlabPitch + kt * 16;
  const uint4 x = *reinterpret_cast<const uint4*>(tile);
  const uint4 y = *reinterpret_cast<const uint4*>(tile + 8 * kSlabPitch);
  uint4 o0, o1;
  o0.x = prmt(x.x, y.x, 0x5410); o0.y = prmt(x.z, y.z, 0x5410);
  o0.z = prmt(x.x, y.x, 0x7632); o0.w = prmt(x.z, y.z, 0x7632);
  o1.x = prmt(x.y, y.y, 0x5410); o1.y = prmt(x.w, y.w, 0x5410);
  o1.z = prmt(x.y, y.y, 0x7632); o1.w = prmt(x.w, y.w, 0x7632);

  const int64_t n_tile = rs * (kSlabRows / 16) + nt;
  const int64_t k_tile = cs * (kSlabBytes / 16) + kt;
  uint8_t* dst = out + 256 * (n_tile + (n_rows / 16) * k_tile) + 32 * rl;
  __stcs(reinterpret_cast<uint4*>(dst), o0);
  __stcs(reinterpret_cast<uint4*>(dst) + 1, o1);
}

}  // namespace w4a8_fastprep
