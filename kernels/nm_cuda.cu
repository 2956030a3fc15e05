// 2:4 gather and scatter at a packed mask's positions, for 16-bit elements (bf16, fp16).
//
// Why CUDA here when kernels/nm_triton.py has the same two operations: these are launched from
// the native layer step (slope_step.cpp), whose backward runs on autograd's device thread with
// no Python at all; a Triton kernel can only be launched from Python. The results are the Triton
// kernels' exactly (both only move bits).
//
// A mask is packed 8 entries per byte along a row (bit i of byte j is column 8 j + i), so with
// cols % 8 == 0 byte i covers dense entries 8 i .. 8 i + 7 (two groups of four) and kept values
// 4 i .. 4 i + 3. One thread per mask byte: a 16-byte load and an 8-byte store when the
// pointers are aligned for them, element by element otherwise (a parameter view into a
// DeepSpeed flat buffer need not be). Argument checks: nm_ops.cpp.
#include "nm_cuda.h"

namespace slope {
namespace {

constexpr int kThreads = 256;

// A group's two kept positions from its 4 mask bits: lowest and highest set bit (3 and 0 for an
// empty group, as the Triton kernels; a valid 2:4 mask has none).
__device__ __forceinline__ int low_bit(unsigned nib) { return nib ? __ffs(nib) - 1 : 3; }
__device__ __forceinline__ int high_bit(unsigned nib) { return nib ? 31 - __clz(nib) : 0; }

// A group of four 16-bit entries is one 64-bit word: entry p in bits [16 p, 16 p + 16).
__device__ __forceinline__ uint32_t pick_pair(uint64_t group, unsigned nib) {
  uint32_t v0 = static_cast<uint32_t>(group >> (16 * low_bit(nib))) & 0xffffu;
  uint32_t v1 = static_cast<uint32_t>(group >> (16 * high_bit(nib))) & 0xffffu;
  return v0 | (v1 << 16);
}

// The group holding `pair` at its mask's two positions (the first value wins if they coincide)
// and zero wherever `keep` has no bit.
__device__ __forceinline__ uint64_t place_pair(uint32_t pair, unsigned nib, unsigned keep) {
  const int p0 = low_bit(nib), p1 = high_bit(nib);
  uint64_t g = static_cast<uint64_t>(pair >> 16) << (16 * p1);
  g = (g & ~(0xffffull << (16 * p0))) | (static_cast<uint64_t>(pair & 0xffffu) << (16 * p0));
  uint64_t lanes = 0;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if ((keep >> k) & 1u) lanes |= 0xffffull << (16 * k);
  }
  return g & lanes;
}

template <bool kVector>
__global__ void gather_kernel(const uint16_t* __restrict__ dense, const uint8_t* __restrict__ bits,
                              uint16_t* __restrict__ out, int64_t n_bytes) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n_bytes) return;
  const unsigned b = bits[i];
  uint64_t g0 = 0, g1 = 0;
  if (kVector) {
    const uint4 v = reinterpret_cast<const uint4*>(dense)[i];
    g0 = v.x | (static_cast<uint64_t>(v.y) << 32);
    g1 = v.z | (static_cast<uint64_t>(v.w) << 32);
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      g0 |= static_cast<uint64_t>(dense[8 * i + k]) << (16 * k);
      g1 |= static_cast<uint64_t>(dense[8 * i + 4 + k]) << (16 * k);
    }
  }
  const uint32_t o0 = pick_pair(g0, b & 15u), o1 = pick_pair(g1, b >> 4);
  if (kVector) {
    reinterpret_cast<uint2*>(out)[i] = make_uint2(o0, o1);
  } else {
    out[4 * i] = o0 & 0xffffu;
    out[4 * i + 1] = o0 >> 16;
    out[4 * i + 2] = o1 & 0xffffu;
    out[4 * i + 3] = o1 >> 16;
  }
}

template <bool kVector, bool kColumn>
__global__ void scatter_kernel(const uint16_t* __restrict__ values,
                               const uint8_t* __restrict__ bits,
                               const uint8_t* __restrict__ column_bits,
                               uint16_t* __restrict__ out, int64_t n_bytes) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n_bytes) return;
  const unsigned b = bits[i];
  const unsigned keep = kColumn ? (b & column_bits[i]) : b;
  uint32_t q0, q1;
  if (kVector) {
    const uint2 v = reinterpret_cast<const uint2*>(values)[i];
    q0 = v.x;
    q1 = v.y;
  } else {
    q0 = values[4 * i] | (static_cast<uint32_t>(values[4 * i + 1]) << 16);
    q1 = values[4 * i + 2] | (static_cast<uint32_t>(values[4 * i + 3]) << 16);
  }
  const uint64_t g0 = place_pair(q0, b & 15u, keep & 15u);
  const uint64_t g1 = place_pair(q1, b >> 4, keep >> 4);
  if (kVector) {
    reinterpret_cast<uint4*>(out)[i] =
        make_uint4(static_cast<uint32_t>(g0), static_cast<uint32_t>(g0 >> 32),
                   static_cast<uint32_t>(g1), static_cast<uint32_t>(g1 >> 32));
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      out[8 * i + k] = static_cast<uint16_t>(g0 >> (16 * k));
      out[8 * i + 4 + k] = static_cast<uint16_t>(g1 >> (16 * k));
    }
  }
}

// W_RC^T's compressed values from the kept-values weight (out, k_w), one thread per slot:
// code 1 + p + 4 r (1..8) = weight[4 (s / 2) + p, (j / 4) * 2 + r]; 0 or 9 (filler) = 0.
// The layout and codes are those of kernels/nm_triton.py's gather_wt_values.
__global__ void gather_wt_kernel(const uint16_t* __restrict__ w, const uint8_t* __restrict__ codes,
                                 uint16_t* __restrict__ out, int64_t n_rows, int64_t n_slots,
                                 int64_t k_w) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n_rows * n_slots) return;
  const int64_t j = i / n_slots, s = i % n_slots;
  const int code = codes[i];
  uint16_t v = 0;
  if (code >= 1 && code <= 8) {
    const int c = code - 1, p = c & 3, r = (c >> 2) & 1;
    v = w[(4 * (s / 2) + p) * k_w + (j / 4) * 2 + r];
  }
  out[i] = v;
}

bool aligned(const void* p, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

}  // namespace

cudaError_t launch_gather_kept_2to4(const void* dense, const uint8_t* bits, void* out,
                                    int64_t n_bytes, cudaStream_t stream) {
  if (n_bytes == 0) return cudaSuccess;
  auto* src = static_cast<const uint16_t*>(dense);
  auto* dst = static_cast<uint16_t*>(out);
  if (aligned(src, 16) && aligned(dst, 8)) {
    gather_kernel<true><<<blocks_for(n_bytes), kThreads, 0, stream>>>(src, bits, dst, n_bytes);
  } else {
    gather_kernel<false><<<blocks_for(n_bytes), kThreads, 0, stream>>>(src, bits, dst, n_bytes);
  }
  return cudaGetLastError();
}

cudaError_t launch_scatter_kept_2to4(const void* values, const uint8_t* bits,
                                     const uint8_t* column_bits, void* out, int64_t n_bytes,
                                     cudaStream_t stream) {
  if (n_bytes == 0) return cudaSuccess;
  auto* src = static_cast<const uint16_t*>(values);
  auto* dst = static_cast<uint16_t*>(out);
  const bool vec = aligned(src, 8) && aligned(dst, 16), col = column_bits != nullptr;
  const uint8_t* cb = col ? column_bits : bits;
  const unsigned g = blocks_for(n_bytes);
  if (vec && col) {
    scatter_kernel<true, true><<<g, kThreads, 0, stream>>>(src, bits, cb, dst, n_bytes);
  } else if (vec) {
    scatter_kernel<true, false><<<g, kThreads, 0, stream>>>(src, bits, cb, dst, n_bytes);
  } else if (col) {
    scatter_kernel<false, true><<<g, kThreads, 0, stream>>>(src, bits, cb, dst, n_bytes);
  } else {
    scatter_kernel<false, false><<<g, kThreads, 0, stream>>>(src, bits, cb, dst, n_bytes);
  }
  return cudaGetLastError();
}

cudaError_t launch_gather_wt_values(const void* weight, const uint8_t* codes, void* out,
                                    int64_t n_rows, int64_t n_slots, int64_t k_w,
                                    cudaStream_t stream) {
  const int64_t n = n_rows * n_slots;
  if (n == 0) return cudaSuccess;
  gather_wt_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
      static_cast<const uint16_t*>(weight), codes, static_cast<uint16_t*>(out), n_rows, n_slots,
      k_w);
  return cudaGetLastError();
}

}  // namespace slope
