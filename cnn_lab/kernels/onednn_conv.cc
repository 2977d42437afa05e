// oneDNN 2-D convolutions on NHWC activations and HWIO kernels, as XLA FFI handlers.
//
// cnn_lab/kernels/build.py compiles this file on first use and registers three targets:
//   cnn_lab_onednn_conv_forward(x, kernel) -> y
//   cnn_lab_onednn_conv_backward(x, kernel, dy) -> (dx, dkernel)
//   cnn_lab_onednn_conv_kernel_backward(x, dy) -> dkernel
// Attributes: strides (2), padding (low and high per spatial dim: 4), dilation (2, XLA's
// convention: 1 is none), threads (OpenMP threads of the call; 0: OpenMP's default, every
// core). float32 only; stand_ins.py sends other cases to XLA's convolution.
// Activations stay in XLA's NHWC buffers (oneDNN's "nhwc" tag); kernels are reordered into
// whatever blocked layout the chosen oneDNN kernel wants, which costs little (kernels are
// small). Input and kernel gradients share one call so that they never run concurrently on
// two XLA threads, each with its own OpenMP team on the same cores.
#include <omp.h>

#include <array>
#include <cstdint>
#include <exception>
#include <mutex>
#include <string>
#include <utility>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = memory::format_tag;
using Ints = ffi::Span<const int64_t>;
using F32 = ffi::Buffer<ffi::F32>;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One convolution's shapes in oneDNN's logical order: NCHW activations, OIHW kernel.
struct Geometry {
  memory::dims src, weights, dst, strides, dilates, pad_l, pad_r;

  // x (N, H, W, C), kernel (KH, KW, I, O), y (N, OH, OW, O).
  Geometry(Ints x, Ints k, Ints y, Ints strides_, Ints padding, Ints dilation)
      : src{x[0], x[3], x[1], x[2]},
        weights{k[3], k[2], k[0], k[1]},
        dst{y[0], y[3], y[1], y[2]},
        strides{strides_[0], strides_[1]},
        dilates{dilation[0] - 1, dilation[1] - 1},
        pad_l{padding[0], padding[2]},
        pad_r{padding[1], padding[3]} {}

  memory::desc Activations(const memory::dims& dims) const {
    return memory::desc(dims, memory::data_type::f32, Tag::nhwc);
  }
  memory::desc AnyKernel() const { return memory::desc(weights, memory::data_type::f32, Tag::any); }
  memory UserKernel(void* data) const {
    return memory({weights, memory::data_type::f32, Tag::hwio}, Engine(), data);
  }

  dnnl::convolution_forward::primitive_desc Forward() const {
    return dnnl::convolution_forward::primitive_desc(
        Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
        Activations(src), AnyKernel(), Activations(dst), strides, dilates, pad_l, pad_r);
  }
};

// `user` in the layout `desc` asks for (a copy only when the layouts differ).
memory Reordered(memory& user, const memory::desc& desc, dnnl::stream& stream) {
  if (user.get_desc() == desc) return user;
  memory out(desc, Engine());
  dnnl::reorder(user, out).execute(stream, user, out);
  return out;
}

std::string Describe(const memory::dims& dims) {
  std::string out = "(";
  for (auto d : dims) out += std::to_string(d) + ",";
  return out + ")";
}

ffi::Error Failed(const std::exception& e, Ints x, Ints k, Ints strides, Ints padding) {
  std::string geometry = " (input NHWC " + Describe({x.begin(), x.end()}) + ", kernel HWIO " +
                         Describe({k.begin(), k.end()}) + ", strides " +
                         Describe({strides.begin(), strides.end()}) + ", padding " +
                         Describe({padding.begin(), padding.end()}) + ")";
  return ffi::Error(ffi::ErrorCode::kInternal,
                    std::string("oneDNN convolution failed: ") + e.what() + geometry);
}

// One device's calls never overlap: each runs an OpenMP team over that device's share of the
// cores (all of them with one device), and two teams started by two XLA threads on the same
// cores would slow each other down. Calls of different devices run side by side.
std::mutex& CallMutex(int32_t device) {
  static std::array<std::mutex, 256> mutexes;
  return mutexes[static_cast<uint32_t>(device) % mutexes.size()];
}

// Holds the device's lock, and sizes the OpenMP team of this XLA thread's next oneDNN calls.
class Call {
 public:
  Call(int32_t device, int64_t threads) : lock_(CallMutex(device)) {
    if (threads > 0) omp_set_num_threads(static_cast<int>(threads));
  }

 private:
  std::lock_guard<std::mutex> lock_;
};

ffi::Error Forward(int32_t device, F32 x, F32 k, ffi::ResultBuffer<ffi::F32> y, Ints strides,
                   Ints padding, Ints dilation, int64_t threads) {
  Call call(device, threads);
  try {
    Geometry g(x.dimensions(), k.dimensions(), y->dimensions(), strides, padding, dilation);
    auto pd = g.Forward();
    dnnl::stream stream(Engine());
    memory src(pd.src_desc(), Engine(), x.typed_data());
    memory dst(pd.dst_desc(), Engine(), y->typed_data());
    memory user_kernel = g.UserKernel(k.typed_data());
    memory kernel = Reordered(user_kernel, pd.weights_desc(), stream);
    dnnl::convolution_forward(pd).execute(
        stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, kernel}, {DNNL_ARG_DST, dst}});
    stream.wait();
  } catch (const std::exception& e) {
    return Failed(e, x.dimensions(), k.dimensions(), strides, padding);
  }
  return ffi::Error::Success();
}

// dx from dy, into XLA's dx buffer.
void BackwardData(const Geometry& g, const dnnl::convolution_forward::primitive_desc& hint,
                  memory& diff_dst, F32 k, float* dx, dnnl::stream& stream) {
  dnnl::convolution_backward_data::primitive_desc pd(
      Engine(), dnnl::algorithm::convolution_direct, g.Activations(g.src), g.AnyKernel(),
      g.Activations(g.dst), g.strides, g.dilates, g.pad_l, g.pad_r, hint);
  memory diff_src(pd.diff_src_desc(), Engine(), dx);
  memory user_kernel = g.UserKernel(k.typed_data());
  memory kernel = Reordered(user_kernel, pd.weights_desc(), stream);
  dnnl::convolution_backward_data(pd).execute(
      stream, {{DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_WEIGHTS, kernel}, {DNNL_ARG_DIFF_SRC, diff_src}});
}

// dkernel from x and dy, into XLA's HWIO dkernel buffer.
void BackwardWeights(const Geometry& g, const dnnl::convolution_forward::primitive_desc& hint,
                     memory& diff_dst, F32 x, float* dk, dnnl::stream& stream) {
  dnnl::convolution_backward_weights::primitive_desc pd(
      Engine(), dnnl::algorithm::convolution_direct, g.Activations(g.src), g.AnyKernel(),
      g.Activations(g.dst), g.strides, g.dilates, g.pad_l, g.pad_r, hint);
  memory src(pd.src_desc(), Engine(), x.typed_data());
  memory user_diff_kernel = g.UserKernel(dk);
  bool in_place = pd.diff_weights_desc() == user_diff_kernel.get_desc();
  memory diff_kernel = in_place ? user_diff_kernel : memory(pd.diff_weights_desc(), Engine());
  dnnl::convolution_backward_weights(pd).execute(
      stream,
      {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_DIFF_WEIGHTS, diff_kernel}});
  if (!in_place) dnnl::reorder(diff_kernel, user_diff_kernel).execute(stream, diff_kernel, user_diff_kernel);
}

ffi::Error Backward(int32_t device, F32 x, F32 k, F32 dy, ffi::ResultBuffer<ffi::F32> dx,
                    ffi::ResultBuffer<ffi::F32> dk, Ints strides, Ints padding, Ints dilation,
                    int64_t threads) {
  Call call(device, threads);
  try {
    Geometry g(x.dimensions(), k.dimensions(), dy.dimensions(), strides, padding, dilation);
    auto hint = g.Forward();
    dnnl::stream stream(Engine());
    memory diff_dst(g.Activations(g.dst), Engine(), dy.typed_data());
    BackwardData(g, hint, diff_dst, k, dx->typed_data(), stream);
    BackwardWeights(g, hint, diff_dst, x, dk->typed_data(), stream);
    stream.wait();
  } catch (const std::exception& e) {
    return Failed(e, x.dimensions(), k.dimensions(), strides, padding);
  }
  return ffi::Error::Success();
}

// The kernel gradient alone, for convolutions of inputs nothing differentiates (images).
ffi::Error KernelBackward(int32_t device, F32 x, F32 dy, ffi::ResultBuffer<ffi::F32> dk,
                          Ints strides, Ints padding, Ints dilation, int64_t threads) {
  Call call(device, threads);
  try {
    Geometry g(x.dimensions(), dk->dimensions(), dy.dimensions(), strides, padding, dilation);
    auto hint = g.Forward();
    dnnl::stream stream(Engine());
    memory diff_dst(g.Activations(g.dst), Engine(), dy.typed_data());
    BackwardWeights(g, hint, diff_dst, x, dk->typed_data(), stream);
    stream.wait();
  } catch (const std::exception& e) {
    return Failed(e, x.dimensions(), dk->dimensions(), strides, padding);
  }
  return ffi::Error::Success();
}

}  // namespace

// Every target takes the device, its buffers, then the same four attributes.
template <typename Binding>
auto WithGeometry(Binding binding) {
  return std::move(binding)
      .template Attr<Ints>("strides")
      .template Attr<Ints>("padding")
      .template Attr<Ints>("dilation")
      .template Attr<int64_t>("threads");
}

auto OnDevice() {
  return ffi::Ffi::Bind().Ctx<ffi::DeviceOrdinal>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnLabOnednnConvForward, Forward,
                              WithGeometry(OnDevice().Arg<F32>().Arg<F32>().Ret<F32>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    CnnLabOnednnConvBackward, Backward,
    WithGeometry(OnDevice().Arg<F32>().Arg<F32>().Arg<F32>().Ret<F32>().Ret<F32>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnLabOnednnConvKernelBackward, KernelBackward,
                              WithGeometry(OnDevice().Arg<F32>().Arg<F32>().Ret<F32>()));
