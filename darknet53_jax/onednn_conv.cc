// oneDNN convolutions as XLA FFI handlers: forward, input gradient and
// kernel gradient of an NHWC/HWIO convolution, in float32 or bfloat16.
//
// Each handler runs one oneDNN primitive on XLA's buffers in place. The
// kernel is kept in XLA's HWIO layout and reordered into the layout that
// oneDNN picks for the shape (the small copy every framework on oneDNN
// makes). Primitives are built once per shape and kept.

#include <cstdint>
#include <cstdio>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum class Pass { kForward, kInputGradient, kKernelGradient };

// One convolution: the shapes of its NHWC input, HWIO kernel and NHWC
// output, its strides and paddings, its element type.
struct Geometry {
  std::vector<int64_t> input, kernel, output;
  int64_t stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right;
  dnnl::memory::data_type type;

  auto Key(Pass pass) const {
    return std::make_tuple(static_cast<int>(pass), input, kernel, output,
                           stride_h, stride_w, pad_top, pad_bottom, pad_left,
                           pad_right, static_cast<int>(type));
  }
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

using dims = dnnl::memory::dims;
using tag = dnnl::memory::format_tag;

dims Nchw(const std::vector<int64_t>& nhwc) {
  return {nhwc[0], nhwc[3], nhwc[1], nhwc[2]};
}

dims Oihw(const std::vector<int64_t>& hwio) {
  return {hwio[3], hwio[2], hwio[0], hwio[1]};
}

dnnl::memory::desc Activations(const std::vector<int64_t>& nhwc,
                               dnnl::memory::data_type type) {
  return dnnl::memory::desc(Nchw(nhwc), type, tag::nhwc);
}

dnnl::memory::desc KernelHwio(const Geometry& g) {
  return dnnl::memory::desc(Oihw(g.kernel), g.type, tag::hwio);
}

dnnl::memory::desc KernelAny(const Geometry& g) {
  return dnnl::memory::desc(Oihw(g.kernel), g.type, tag::any);
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training,
      dnnl::algorithm::convolution_direct, Activations(g.input, g.type),
      KernelAny(g), Activations(g.output, g.type), {g.stride_h, g.stride_w},
      {g.pad_top, g.pad_left}, {g.pad_bottom, g.pad_right});
}

// A built primitive, and the reorder between the HWIO kernel and the layout
// the primitive wants (none where they agree).
struct Plan {
  dnnl::primitive primitive;
  std::string implementation;  // oneDNN's name for the kernel it chose.
  dnnl::memory::desc kernel_desc;  // The primitive's kernel layout.
  std::unique_ptr<dnnl::reorder> kernel_reorder;
};

Plan MakePlan(const Geometry& g, Pass pass) {
  Plan plan;
  auto forward = ForwardDesc(g);
  switch (pass) {
    case Pass::kForward:
      plan.primitive = dnnl::convolution_forward(forward);
      plan.implementation = forward.impl_info_str();
      plan.kernel_desc = forward.weights_desc();
      break;
    case Pass::kInputGradient: {
      dnnl::convolution_backward_data::primitive_desc desc(
          Engine(), dnnl::algorithm::convolution_direct,
          Activations(g.input, g.type), KernelAny(g),
          Activations(g.output, g.type), {g.stride_h, g.stride_w},
          {g.pad_top, g.pad_left}, {g.pad_bottom, g.pad_right}, forward);
      plan.primitive = dnnl::convolution_backward_data(desc);
      plan.implementation = desc.impl_info_str();
      plan.kernel_desc = desc.weights_desc();
      break;
    }
    case Pass::kKernelGradient: {
      dnnl::convolution_backward_weights::primitive_desc desc(
          Engine(), dnnl::algorithm::convolution_direct,
          Activations(g.input, g.type), KernelAny(g),
          Activations(g.output, g.type), {g.stride_h, g.stride_w},
          {g.pad_top, g.pad_left}, {g.pad_bottom, g.pad_right}, forward);
      plan.primitive = dnnl::convolution_backward_weights(desc);
      plan.implementation = desc.impl_info_str();
      plan.kernel_desc = desc.diff_weights_desc();
      break;
    }
  }
  if (plan.kernel_desc != KernelHwio(g)) {
    auto from = pass == Pass::kKernelGradient ? plan.kernel_desc : KernelHwio(g);
    auto to = pass == Pass::kKernelGradient ? KernelHwio(g) : plan.kernel_desc;
    plan.kernel_reorder = std::make_unique<dnnl::reorder>(
        dnnl::reorder::primitive_desc(Engine(), from, Engine(), to));
  }
  return plan;
}

const Plan& CachedPlan(const Geometry& g, Pass pass) {
  static std::mutex mutex;
  static std::map<decltype(g.Key(pass)), std::unique_ptr<Plan>> plans;
  std::lock_guard<std::mutex> lock(mutex);
  auto& plan = plans[g.Key(pass)];
  if (!plan) plan = std::make_unique<Plan>(MakePlan(g, pass));
  return *plan;
}

std::vector<int64_t> Dimensions(const ffi::AnyBuffer& buffer) {
  auto d = buffer.dimensions();
  return std::vector<int64_t>(d.begin(), d.end());
}

// oneDNN's type for XLA's, or `undef` for a type these handlers do not take.
dnnl::memory::data_type DataType(ffi::DataType type) {
  switch (type) {
    case ffi::DataType::F32:
      return dnnl::memory::data_type::f32;
    case ffi::DataType::BF16:
      return dnnl::memory::data_type::bf16;
    default:
      return dnnl::memory::data_type::undef;
  }
}

// Runs `pass` of the convolution: `input`, `kernel`, `output` are the
// buffers of x (NHWC), the kernel (HWIO) and y (NHWC) or their gradients,
// whichever the pass reads and writes.
ffi::Error Run(Pass pass, void* input, void* kernel, void* output,
               const Geometry& g) {
  try {
    const Plan& plan = CachedPlan(g, pass);
    dnnl::stream stream(Engine());
    dnnl::memory input_memory(Activations(g.input, g.type), Engine(), input);
    dnnl::memory output_memory(Activations(g.output, g.type), Engine(),
                               output);
    dnnl::memory hwio(KernelHwio(g), Engine(), kernel);
    dnnl::memory kernel_memory =
        plan.kernel_reorder ? dnnl::memory(plan.kernel_desc, Engine()) : hwio;
    if (plan.kernel_reorder && pass != Pass::kKernelGradient) {
      plan.kernel_reorder->execute(stream, hwio, kernel_memory);
    }
    switch (pass) {
      case Pass::kForward:
        plan.primitive.execute(stream, {{DNNL_ARG_SRC, input_memory},
                                        {DNNL_ARG_WEIGHTS, kernel_memory},
                                        {DNNL_ARG_DST, output_memory}});
        break;
      case Pass::kInputGradient:
        plan.primitive.execute(stream, {{DNNL_ARG_DIFF_SRC, input_memory},
                                        {DNNL_ARG_WEIGHTS, kernel_memory},
                                        {DNNL_ARG_DIFF_DST, output_memory}});
        break;
      case Pass::kKernelGradient:
        plan.primitive.execute(stream,
                               {{DNNL_ARG_SRC, input_memory},
                                {DNNL_ARG_DIFF_WEIGHTS, kernel_memory},
                                {DNNL_ARG_DIFF_DST, output_memory}});
        if (plan.kernel_reorder) {
          plan.kernel_reorder->execute(stream, kernel_memory, hwio);
        }
        break;
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Convolve(Pass pass, ffi::AnyBuffer input, ffi::AnyBuffer kernel,
                    ffi::AnyBuffer output, int64_t stride_h, int64_t stride_w,
                    int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
                    int64_t pad_right) {
  auto type = DataType(input.element_type());
  if (type == dnnl::memory::data_type::undef) {
    return ffi::Error::InvalidArgument(
        "oneDNN convolutions take float32 or bfloat16 only");
  }
  if (kernel.element_type() != input.element_type() ||
      output.element_type() != input.element_type()) {
    return ffi::Error::InvalidArgument(
        "oneDNN convolutions take operands of one element type");
  }
  Geometry g{Dimensions(input), Dimensions(kernel), Dimensions(output),
             stride_h,          stride_w,           pad_top,
             pad_bottom,        pad_left,           pad_right,
             type};
  return Run(pass, input.untyped_data(), kernel.untyped_data(),
             output.untyped_data(), g);
}

ffi::Error Forward(ffi::AnyBuffer x, ffi::AnyBuffer kernel,
                   ffi::Result<ffi::AnyBuffer> y, int64_t stride_h,
                   int64_t stride_w, int64_t pad_top, int64_t pad_bottom,
                   int64_t pad_left, int64_t pad_right) {
  return Convolve(Pass::kForward, x, kernel, *y, stride_h, stride_w, pad_top,
                  pad_bottom, pad_left, pad_right);
}

ffi::Error InputGradient(ffi::AnyBuffer dy, ffi::AnyBuffer kernel,
                         ffi::Result<ffi::AnyBuffer> dx, int64_t stride_h,
                         int64_t stride_w, int64_t pad_top,
                         int64_t pad_bottom, int64_t pad_left,
                         int64_t pad_right) {
  return Convolve(Pass::kInputGradient, *dx, kernel, dy, stride_h, stride_w,
                  pad_top, pad_bottom, pad_left, pad_right);
}

ffi::Error KernelGradient(ffi::AnyBuffer x, ffi::AnyBuffer dy,
                          ffi::Result<ffi::AnyBuffer> dkernel,
                          int64_t stride_h, int64_t stride_w, int64_t pad_top,
                          int64_t pad_bottom, int64_t pad_left,
                          int64_t pad_right) {
  return Convolve(Pass::kKernelGradient, x, *dkernel, dy, stride_h, stride_w,
                  pad_top, pad_bottom, pad_left, pad_right);
}

template <typename Binding>
auto WithGeometry(Binding binding) {
  return std::move(binding)
      .template Attr<int64_t>("stride_h")
      .template Attr<int64_t>("stride_w")
      .template Attr<int64_t>("pad_top")
      .template Attr<int64_t>("pad_bottom")
      .template Attr<int64_t>("pad_left")
      .template Attr<int64_t>("pad_right");
}

}  // namespace

// 1 where oneDNN runs all three passes of a bfloat16 convolution with a
// kernel made for this CPU; else 0, with the reason in `message` (its
// runtime may miss a device, or have only its slow reference kernels, as
// on CPUs without AVX-512).
extern "C" int darknet53_onednn_ready(char* message, int size) {
  const Geometry probe{{1, 8, 8, 32}, {3, 3, 32, 32}, {1, 8, 8, 32}, 1, 1,
                       1,  1,  1,  1,  dnnl::memory::data_type::bf16};
  try {
    for (Pass pass :
         {Pass::kForward, Pass::kInputGradient, Pass::kKernelGradient}) {
      std::string implementation = MakePlan(probe, pass).implementation;
      if (implementation.rfind("ref", 0) == 0) {
        std::snprintf(message, size,
                      "oneDNN has only its reference bfloat16 convolution "
                      "(%s) on this CPU",
                      implementation.c_str());
        return 0;
      }
    }
    return 1;
  } catch (const std::exception& e) {
    std::snprintf(message, size, "%s", e.what());
    return 0;
  }
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    darknet53_onednn_conv_forward, Forward,
    WithGeometry(ffi::Ffi::Bind()
                     .Arg<ffi::AnyBuffer>()
                     .Arg<ffi::AnyBuffer>()
                     .Ret<ffi::AnyBuffer>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    darknet53_onednn_conv_input_gradient, InputGradient,
    WithGeometry(ffi::Ffi::Bind()
                     .Arg<ffi::AnyBuffer>()
                     .Arg<ffi::AnyBuffer>()
                     .Ret<ffi::AnyBuffer>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    darknet53_onednn_conv_kernel_gradient, KernelGradient,
    WithGeometry(ffi::Ffi::Bind()
                     .Arg<ffi::AnyBuffer>()
                     .Arg<ffi::AnyBuffer>()
                     .Ret<ffi::AnyBuffer>()));
