// CUDA kernel of collab_fast::scaled_sum: out = scale * (g_1 + ... + g_n), one pass, 16-byte vector
// loads and stores, grid-stride loop, fp32 accumulation (fp64 for double). Checks and registration live
// in rescale.cpp.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/types.h>

#include <algorithm>
#include <vector>

namespace collab_fast {

constexpr int kMaxFused = 8;  // inputs summed per launch; more inputs chain launches through an fp32 buffer

template <typename T>
struct Pointers {
  const T* p[kMaxFused];
};

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Packet {
  T v[VEC];
};

// ACC: also add the running sum held in acc (fp32/fp64) — used when n > kMaxFused.
// FINAL: write scale * sum to out (else write the unscaled sum to acc).
template <typename scalar_t, typename opmath_t, int VEC, bool ACC, bool FINAL>
__global__ void scaled_sum_kernel(Pointers<scalar_t> in, int n, opmath_t* acc, scalar_t* out, int64_t numel,
                                  opmath_t scale) {
  const int64_t num_packets = numel / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < num_packets; i += stride) {
    opmath_t sum[VEC];
    const auto first = reinterpret_cast<const Packet<scalar_t, VEC>*>(in.p[0])[i];
#pragma unroll
    for (int j = 0; j < VEC; ++j) sum[j] = static_cast<opmath_t>(first.v[j]);
    // Fully unrolled over the fixed capacity: every in.p[k] is a constant index into the kernel's parameter
    // space, so the pointer array is never copied to local memory (a runtime index would put it on the stack).
#pragma unroll
    for (int k = 1; k < kMaxFused; ++k) {
      if (k < n) {
        const auto pk = reinterpret_cast<const Packet<scalar_t, VEC>*>(in.p[k])[i];
#pragma unroll
        for (int j = 0; j < VEC; ++j) sum[j] += static_cast<opmath_t>(pk.v[j]);
      }
    }
    if constexpr (ACC) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) sum[j] += acc[i * VEC + j];
    }
    if constexpr (FINAL) {
      Packet<scalar_t, VEC> o;
#pragma unroll
      for (int j = 0; j < VEC; ++j) o.v[j] = static_cast<scalar_t>(sum[j] * scale);
      reinterpret_cast<Packet<scalar_t, VEC>*>(out)[i] = o;
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[i * VEC + j] = sum[j];
    }
  }
  // Tail (numel not a multiple of VEC): one thread per element.
  for (int64_t e = num_packets * VEC + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < numel;
       e += stride) {
    opmath_t s = static_cast<opmath_t>(in.p[0][e]);
#pragma unroll
    for (int k = 1; k < kMaxFused; ++k) {
      if (k < n) s += static_cast<opmath_t>(in.p[k][e]);
    }
    if constexpr (ACC) s += acc[e];
    if constexpr (FINAL) {
      out[e] = static_cast<scalar_t>(s * scale);
    } else {
      acc[e] = s;
    }
  }
}

static int sm_count() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

template <typename scalar_t, int VEC, bool ACC, bool FINAL>
static void launch(const Pointers<scalar_t>& ptrs, int n, at::opmath_type<scalar_t>* acc, scalar_t* out,
                   int64_t numel, double scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kThreads = 256;
  const int64_t work = (numel + VEC - 1) / VEC;
  const int sms = sm_count();
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, sms * 8LL));
  scaled_sum_kernel<scalar_t, opmath_t, VEC, ACC, FINAL>
      <<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          ptrs, n, acc, out, numel, static_cast<opmath_t>(scale));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int VEC>
static void run_all(const std::vector<at::Tensor>& inputs, at::Tensor& out, double scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t numel = out.numel();
  const int n = static_cast<int>(inputs.size());
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
  if (n <= kMaxFused) {
    Pointers<scalar_t> ptrs{};
    for (int k = 0; k < n; ++k) ptrs.p[k] = inputs[k].const_data_ptr<scalar_t>();
    launch<scalar_t, VEC, false, true>(ptrs, n, nullptr, out_ptr, numel, scale);
    return;
  }
  // More than kMaxFused children: sum groups into a wide buffer, scale on the last group.
  at::Tensor acc = at::empty({numel}, out.options().dtype(c10::CppTypeToScalarType<opmath_t>::value));
  opmath_t* acc_ptr = acc.mutable_data_ptr<opmath_t>();
  for (int start = 0; start < n; start += kMaxFused) {
    const int m = std::min(kMaxFused, n - start);
    Pointers<scalar_t> ptrs{};
    for (int k = 0; k < m; ++k) ptrs.p[k] = inputs[start + k].const_data_ptr<scalar_t>();
    const bool first = start == 0, last = start + m >= n;
    if (first) {
      launch<scalar_t, VEC, false, false>(ptrs, m, acc_ptr, out_ptr, numel, scale);
    } else if (!last) {
      launch<scalar_t, VEC, true, false>(ptrs, m, acc_ptr, out_ptr, numel, scale);
    } else {
      launch<scalar_t, VEC, true, true>(ptrs, m, acc_ptr, out_ptr, numel, scale);
    }
  }
}

static bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Declared in rescale.cpp, which does the argument checks and lays the inputs out like the output.
std::vector<at::Tensor> prepare_inputs_for_cuda(at::TensorList grads, double scale, at::Tensor& out);

at::Tensor scaled_sum_cuda(at::TensorList grads, double scale) {
  at::Tensor out;
  const auto inputs = prepare_inputs_for_cuda(grads, scale, out);
  TORCH_CHECK(out.is_cuda(), "collab_fast::scaled_sum (CUDA kernel) got tensors on ", out.device().str());
  const c10::cuda::CUDAGuard guard(out.device());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "scaled_sum_cuda", [&] {
    bool aligned = aligned16(out.const_data_ptr());
    for (const auto& g : inputs) aligned = aligned && aligned16(g.const_data_ptr());
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (aligned) {
      run_all<scalar_t, kVec>(inputs, out, scale);
    } else {
      run_all<scalar_t, 1>(inputs, out, scale);
    }
  });
  return out;
}

}  // namespace collab_fast
