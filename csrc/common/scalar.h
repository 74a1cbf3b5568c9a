// Scalar helpers shared by host and device code. Kept free of torch and Python so the same math
// compiles into the CPU kernels, the CUDA kernels and the native C++ tests.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define R2M_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define R2M_HOST_DEVICE inline
#endif

// Inlined into every caller, whatever the optimiser would choose: helpers of the CPU kernels must
// be compiled into each vector-width clone of their caller (common/cpu_clones.h), not called at the
// baseline width. R2M_INLINE_LAMBDA does the same for a lambda (written after its parameters).
#if defined(__GNUC__)
#define R2M_ALWAYS_INLINE inline __attribute__((always_inline))
#define R2M_INLINE_LAMBDA __attribute__((always_inline))
#else
#define R2M_ALWAYS_INLINE inline
#define R2M_INLINE_LAMBDA
#endif

namespace r2m {

// The element types the ops accept. 16-bit inputs are widened on load: every op computes and
// accumulates in float32 or float64, never in 16 bits.
enum class ScalarKind : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// A float32's bit pattern, and back.
R2M_HOST_DEVICE uint32_t float_bits(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(value);
#else
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
#endif
}

R2M_HOST_DEVICE float bits_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
#endif
}

R2M_HOST_DEVICE float bf16_bits_to_float(uint16_t bits) {
  return bits_float(static_cast<uint32_t>(bits) << 16);
}

// IEEE 754 binary16 -> binary32, including subnormals, infinities and NaN.
R2M_HOST_DEVICE float fp16_bits_to_float(uint16_t bits) {
  uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  uint32_t exponent = (bits >> 10) & 0x1fu;
  uint32_t mantissa = bits & 0x3ffu;
  uint32_t out_bits;
  if (exponent == 0) {
    if (mantissa == 0) {
      out_bits = sign;
    } else {
      // Subnormal half: renormalise into a normal float.
      exponent = 127 - 15 + 1;
      while ((mantissa & 0x400u) == 0) {
        mantissa <<= 1;
        --exponent;
      }
      mantissa &= 0x3ffu;
      out_bits = sign | (exponent << 23) | (mantissa << 13);
    }
  } else if (exponent == 0x1f) {
    out_bits = sign | 0x7f800000u | (mantissa << 13);
  } else {
    out_bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
  }
  float out;
#if defined(__CUDA_ARCH__)
  out = __uint_as_float(out_bits);
#else
  std::memcpy(&out, &out_bits, sizeof(out));
#endif
  return out;
}

// 16-bit elements as stored, so that templates can tell the kinds apart by type.
struct BFloat16Bits {
  uint16_t bits;
};
struct Float16Bits {
  uint16_t bits;
};

// Exact widening of one element to double, by its storage type (for loops templated on the
// kind, where a switch per element would keep the compiler from vectorising).
R2M_HOST_DEVICE double widen(float value) { return value; }
R2M_HOST_DEVICE double widen(double value) { return value; }
R2M_HOST_DEVICE double widen(BFloat16Bits value) { return bf16_bits_to_float(value.bits); }
R2M_HOST_DEVICE double widen(Float16Bits value) { return fp16_bits_to_float(value.bits); }

// The float32 value the merge computes with: 16-bit kinds widen exactly, float64 rounds to
// nearest (as torch's .to(float32) does).
R2M_HOST_DEVICE float to_float(float value) { return value; }
R2M_HOST_DEVICE float to_float(double value) { return static_cast<float>(value); }
R2M_HOST_DEVICE float to_float(BFloat16Bits value) { return bf16_bits_to_float(value.bits); }
R2M_HOST_DEVICE float to_float(Float16Bits value) { return fp16_bits_to_float(value.bits); }

// Calls `typed(tag)` with a value of the storage type of `kind` (float, double, BFloat16Bits or
// Float16Bits) and returns its result: the one place a ScalarKind becomes a C++ type, in host
// code, once per call of a kernel (a per-element switch would keep loops from vectorising).
// Kinds are checked where tensors enter the ops (python/ops/scalar_kind.h).
template <typename Typed>
R2M_ALWAYS_INLINE auto dispatch_kind(ScalarKind kind, Typed&& typed) -> decltype(typed(float{})) {
  switch (kind) {
    case ScalarKind::kFloat64:
      return typed(double{});
    case ScalarKind::kBFloat16:
      return typed(BFloat16Bits{});
    case ScalarKind::kFloat16:
      return typed(Float16Bits{});
    case ScalarKind::kFloat32:
      break;
  }
  return typed(float{});
}

// Loads element `i` of a buffer of the given kind as a double.
R2M_HOST_DEVICE double load_as_double(const void* data, ScalarKind kind, int64_t i) {
  switch (kind) {
    case ScalarKind::kFloat32:
      return static_cast<double>(static_cast<const float*>(data)[i]);
    case ScalarKind::kFloat64:
      return static_cast<const double*>(data)[i];
    case ScalarKind::kBFloat16:
      return static_cast<double>(bf16_bits_to_float(static_cast<const uint16_t*>(data)[i]));
    case ScalarKind::kFloat16:
      return static_cast<double>(fp16_bits_to_float(static_cast<const uint16_t*>(data)[i]));
  }
  return 0.0;
}

}  // namespace r2m
