// Backprop rescaling (Song & Chai 2018, eq. 5-6): the C++ API of collab_fast.
//
//   scaled_sum(gs, s):   s * (g_1 + ... + g_n) in one pass: each input read once, the result written
//                        once, accumulated in fp32 (fp64 for double).
//
// It is the backward of branch(x, n) (n children of a split point: dx = s * (dy_1 + ... + dy_n)) and of
// grad_rescale(x, s) (n = 1). Those two are autograd Functions in rescale.py, not registered ops: their
// forward returns aliases of x (no copy), and an op whose outputs alias its input loses its backward
// where the outputs leave a torch.compile graph (AOTAutograd regenerates them as plain views), so it
// could never pass opcheck. Scales that are powers of two (1/2, 1/4, 1/8) make the sum's scaling exact.
//
// Registration: TORCH_LIBRARY_FRAGMENT schema; CPU, CUDA (the fused kernel, or ATen calls in a build
// without nvcc) and Meta kernels, ATen calls for any other device (CompositeExplicitAutograd). Its
// gradient (scale * grad_out for every input: double backward) is registered from Python.

// ATen and torch's pybind11 casters, not <torch/extension.h>: that one also parses the whole C++ frontend
// (torch/all.h), which doubles the first build (58 s -> 29 s on 2 cores, torch 2.13) for nothing used here.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>
#include <torch/version.h>

#include <cmath>
#include <string>
#include <vector>

namespace collab_fast {

// ------------------------------------------------------------------------------------------ checks
//
// Numbers enter the messages as strings made by std::to_string (C formatting), never through `stream <<
// number`: a toolchain that links parts of libstdc++ into the extension statically gives it iostream facets
// that do not match the process's locale, and then formatting a number in TORCH_CHECK prints nothing (seen
// here with -static-libstdc++) or crashes with SIGSEGV (seen on an H200 image with torch 2.11). Strings,
// dtypes and devices are inserted as text, which touches no facet.

static std::string num(double v) { return std::to_string(v); }
static std::string num(int64_t v) { return std::to_string(v); }

static std::string shape(at::IntArrayRef sizes) {
  std::string s = "[";
  for (const auto i : c10::irange(sizes.size())) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

static void check_scale(double scale, const char* op) {
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be a finite number, got ", num(scale));
}

static void check_float(const at::Tensor& t, const char* op, const char* what) {
  TORCH_CHECK(t.defined(), op, ": ", what, " is undefined");
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op, ": ", what,
              " must be float32, float64, float16 or bfloat16, got ", c10::toString(dt));
}

// Checks the inputs of scaled_sum and returns them laid out like the output: inputs whose strides
// differ from the first one's (or that overlap / have gaps) are copied into that layout first.
static std::vector<at::Tensor> prepare_inputs(const at::TensorList grads, at::Tensor& out, const char* op) {
  TORCH_CHECK(!grads.empty(), op, ": needs at least one gradient");
  const auto& g0 = grads[0];
  for (const auto i : c10::irange(grads.size())) {
    const auto& g = grads[i];
    const std::string gi = "grads[" + num(static_cast<int64_t>(i)) + "]";
    check_float(g, op, gi.c_str());
    TORCH_CHECK(g.sizes() == g0.sizes(), op, ": ", gi, " has shape ", shape(g.sizes()), " but grads[0] has ",
                shape(g0.sizes()));
    TORCH_CHECK(g.scalar_type() == g0.scalar_type(), op, ": ", gi, " is ", c10::toString(g.scalar_type()),
                " but grads[0] is ", c10::toString(g0.scalar_type()));
    TORCH_CHECK(g.device() == g0.device(), op, ": ", gi, " is on ", g.device().str(), " but grads[0] is on ",
                g0.device().str());
  }
  // Output: g0's layout when it is dense (keeps channels_last), else contiguous.
  out = g0.is_non_overlapping_and_dense() ? at::empty_like(g0) : at::empty(g0.sizes(), g0.options());
  std::vector<at::Tensor> inputs;
  inputs.reserve(grads.size());
  for (const auto& g : grads) {
    inputs.push_back(g.strides() == out.strides() ? g : at::empty_like(out).copy_(g));
  }
  return inputs;
}

// ------------------------------------------------------------------------------------------ CPU kernel

template <typename scalar_t>
static void scaled_sum_cpu_impl(const std::vector<const scalar_t*>& in, scalar_t* out, int64_t numel,
                                double scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<scalar_t>;
  using VecM = at::vec::Vectorized<opmath_t>;
  const int64_t n = static_cast<int64_t>(in.size());
  const opmath_t s = static_cast<opmath_t>(scale);
  constexpr bool reduced = !std::is_same_v<scalar_t, opmath_t>;  // half / bfloat16: widen to float
  at::parallel_for(0, numel, 32768, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    const int64_t vec_end = begin + (end - begin) / Vec::size() * Vec::size();
    for (; i < vec_end; i += Vec::size()) {
      if constexpr (reduced) {
        auto [a0, a1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(in[0] + i));
        for (int64_t k = 1; k < n; ++k) {
          auto [b0, b1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(in[k] + i));
          a0 = a0 + b0;
          a1 = a1 + b1;
        }
        at::vec::convert_from_float<scalar_t>(a0 * VecM(s), a1 * VecM(s)).store(out + i);
      } else {
        Vec acc = Vec::loadu(in[0] + i);
        for (int64_t k = 1; k < n; ++k) acc = acc + Vec::loadu(in[k] + i);
        (acc * Vec(s)).store(out + i);
      }
    }
    for (; i < end; ++i) {
      opmath_t acc = static_cast<opmath_t>(in[0][i]);
      for (int64_t k = 1; k < n; ++k) acc += static_cast<opmath_t>(in[k][i]);
      out[i] = static_cast<scalar_t>(acc * s);
    }
  });
}

at::Tensor scaled_sum_cpu(at::TensorList grads, double scale) {
  check_scale(scale, "collab_fast::scaled_sum");
  at::Tensor out;
  const auto inputs = prepare_inputs(grads, out, "collab_fast::scaled_sum");
  TORCH_CHECK(out.device().is_cpu(), "collab_fast::scaled_sum (CPU kernel) got tensors on ", out.device().str());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "scaled_sum_cpu", [&] {
    std::vector<const scalar_t*> ptrs;
    for (const auto& g : inputs) ptrs.push_back(g.const_data_ptr<scalar_t>());
    scaled_sum_cpu_impl<scalar_t>(ptrs, out.mutable_data_ptr<scalar_t>(), out.numel(), scale);
  });
  return out;
}

#ifdef WITH_CUDA
at::Tensor scaled_sum_cuda(at::TensorList grads, double scale);  // rescale_cuda.cu

std::vector<at::Tensor> prepare_inputs_for_cuda(at::TensorList grads, double scale, at::Tensor& out) {
  check_scale(scale, "collab_fast::scaled_sum");
  return prepare_inputs(grads, out, "collab_fast::scaled_sum");
}
#endif

at::Tensor scaled_sum_meta(at::TensorList grads, double scale) {
  check_scale(scale, "collab_fast::scaled_sum");
  at::Tensor out;
  prepare_inputs(grads, out, "collab_fast::scaled_sum");
  return out;
}

// ------------------------------------------------------------------------------------------ ATen implementation

// scaled_sum from ATen calls, for every device without a kernel of its own: CUDA where the extension was
// built without nvcc (a pip-installed torch ships none), MPS, XPU. The same arithmetic as the kernels
// (inputs summed in the op-math type in order, then scaled once), so the results equal theirs; it costs
// n + 1 passes over memory where the fused kernel makes one (two-way split: 5 tensor reads/writes vs 3).
at::Tensor scaled_sum_aten(at::TensorList grads, double scale) {
  check_scale(scale, "collab_fast::scaled_sum");
  at::Tensor out;
  const auto inputs = prepare_inputs(grads, out, "collab_fast::scaled_sum");
  const auto opmath = at::toOpMathType(out.scalar_type());
  at::Tensor acc = inputs.size() > 1 ? at::add(inputs[0].to(opmath), inputs[1]) : inputs[0].to(opmath, false, true);
  for (size_t k = 2; k < inputs.size(); ++k) acc.add_(inputs[k]);
  acc.mul_(scale);
  if (acc.scalar_type() == out.scalar_type()) return acc;
  return out.copy_(acc);
}

}  // namespace collab_fast

// ------------------------------------------------------------------------------------------ registration

// A fragment: the namespace is shared with the Python-registered Triton ops (collab_loss_*).
TORCH_LIBRARY_FRAGMENT(collab_fast, m) {
  m.def("scaled_sum(Tensor[] grads, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(collab_fast, CPU, m) { m.impl("scaled_sum", &collab_fast::scaled_sum_cpu); }

// CUDA: the fused kernel when nvcc built it, else the ATen implementation (torch's own CUDA kernels, no
// nvcc needed to compile this file). Any other device: the ATen implementation.
#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(collab_fast, CUDA, m) { m.impl("scaled_sum", &collab_fast::scaled_sum_cuda); }
#else
TORCH_LIBRARY_IMPL(collab_fast, CUDA, m) { m.impl("scaled_sum", &collab_fast::scaled_sum_aten); }
#endif

TORCH_LIBRARY_IMPL(collab_fast, Meta, m) { m.impl("scaled_sum", &collab_fast::scaled_sum_meta); }

TORCH_LIBRARY_IMPL(collab_fast, CompositeExplicitAutograd, m) { m.impl("scaled_sum", &collab_fast::scaled_sum_aten); }

// ------------------------------------------------------------------------------------------ build info

static py::dict build_info() {
  py::dict d;
  d["torch_version"] = TORCH_VERSION;
#ifdef WITH_CUDA
  d["cuda"] = true;
  d["cuda_impl"] = "kernel";
#else
  d["cuda"] = false;
  d["cuda_impl"] = "aten";
#endif
#if defined(CPU_CAPABILITY_AVX512)
  d["cpu_capability"] = "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
  d["cpu_capability"] = "avx2";
#else
  d["cpu_capability"] = "default";
#endif
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#else
  d["compiler"] = "unknown";
#endif
  d["ops"] = py::make_tuple("scaled_sum");
  return d;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "collab_fast C++ extension: backprop rescaling ops (registered as torch.ops.collab_fast.*)";
  m.def("build_info", &build_info, "How this extension was built");
  m.def("scaled_sum_aten", [](const std::vector<at::Tensor>& grads, double scale) {
          return collab_fast::scaled_sum_aten(grads, scale);
        }, "scaled_sum through ATen calls (what CUDA tensors use "
        "in a build without nvcc); for tests");
}
