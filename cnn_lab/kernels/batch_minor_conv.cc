// Stride-1 2-D convolutions with the batch in the vector lanes, as XLA FFI handlers.
//
// For convolutions with few channels (LeNet-5's 3 -> 6 and 6 -> 16) a kernel that puts
// channels in the vector lanes leaves most lanes idle. These kernels put 16 images in each
// lane instead: activations are "batch-minor" (physical order H, W, C, N; XLA produces and
// consumes that layout itself, fusing the transposes into neighbouring ops), and every
// multiply-add of a 16-image vector with one broadcast kernel weight is useful work.
//
// cnn_lab/kernels/build.py compiles this file with -march=native on first use; it registers:
//   cnn_lab_batch_minor_conv_forward(x, kernel, bias) -> y; attributes pad_top, pad_left
//     y[n, i, j, o] = bias[o] + sum over (a, b, c) of
//     x[n, i + a - pad_top, j + b - pad_left, c] * kernel[a, b, c, o], taps outside x being
//     zero; y's shape gives the bottom and right padding. The input gradient is this call on
//     dy with the flipped, transposed kernel and a zero bias.
//   cnn_lab_batch_minor_conv_kernel_backward(x, dy) -> (dkernel, dbias), for an x padded by
//     the caller. The bias gradient comes from the dy vectors this pass reads anyway; XLA
//     would re-lay the whole batch-minor dy out to sum it.
// x, y and dy are logically (N, H, W, C) with physical layout (H, W, C, N); kernels are HWIO.
// N must be a multiple of 16 (stand_ins.py sends other batches to oneDNN). Written for
// AVX-512's 32 vector registers; other x86-64 CPUs compile it too. Work is split into tasks
// on XLA's own intra-op thread pool and the handlers return a future, so they never compete
// with XLA's other ops for the cores.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using F32 = ffi::Buffer<ffi::F32>;

namespace {

constexpr int kLanes = 16;
constexpr int kMaxVectors = 4;  // Lane vectors of the batch one task holds: 64 images.
constexpr int kAccumulators = 24;  // Of the 32 vector registers, leaving room for operands.
constexpr int kTasksPerThread = 4;  // Finer tasks balance around XLA's other work.
// Bounds the kernel gradient's per-task partial sums (64 bytes per weight and task).
constexpr int64_t kPartialBytes = int64_t{64} << 20;

typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef float UnalignedVec __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));
inline Vec Load(const float* p) { return *reinterpret_cast<const UnalignedVec*>(p); }
inline void Store(float* p, Vec v) { *reinterpret_cast<UnalignedVec*>(p) = v; }
// Keeps a loaded vector in a register: otherwise GCC re-reads it from memory in every
// multiply-add, which doubles the loads and halves the speed. Without AVX-512 a 16-float
// vector spans two registers, which the constraint cannot name.
#ifdef __AVX512F__
inline void Pin(Vec& v) { __asm__("" : "+v"(v)); }
#else
inline void Pin(Vec&) {}
#endif

// Shapes of one call; strides of the batch-minor arrays in floats.
struct Geometry {
  int64_t n, h, w, c, kh, kw, o, out_h, out_w;
  int64_t XRow() const { return w * c * n; }
  int64_t XColumn() const { return c * n; }
  int64_t YColumn() const { return o * n; }
  int64_t BatchBlocks() const { return (n + kMaxVectors * kLanes - 1) / (kMaxVectors * kLanes); }
  int Vectors(int64_t block) const {
    return static_cast<int>(std::min<int64_t>(kMaxVectors, (n - block * kMaxVectors * kLanes) / kLanes));
  }
};

Geometry Shapes(ffi::Span<const int64_t> x, ffi::Span<const int64_t> k, ffi::Span<const int64_t> y) {
  return {x[0], x[1], x[2], x[3], k[0], k[1], k[3], y[1], y[2]};
}

// y[CHANNELS channels][VECTORS lane vectors] of one output pixel from rows x cols taps; x
// points at the first tap inside x and k at that tap's weights for channel 0.
template <int CHANNELS, int VECTORS>
void ForwardTile(const Geometry& g, const float* x, const float* k, const float* bias, float* y,
                 int rows, int cols) {
  // Locals, not g's fields: the compiler cannot keep those in registers across the stores.
  const int64_t n = g.n, c = g.c, o_count = g.o, kw = g.kw, row = g.XRow(), column = g.XColumn();
  Vec acc[CHANNELS][VECTORS];
  for (int o = 0; o < CHANNELS; ++o)
    for (auto& v : acc[o]) v = Vec{} + bias[o];
  for (int a = 0; a < rows; ++a)
    for (int b = 0; b < cols; ++b) {
      const float* xp = x + a * row + b * column;
      const float* kp = k + (a * kw + b) * c * o_count;
      for (int64_t i = 0; i < c; ++i, xp += n, kp += o_count) {
        Vec xv[VECTORS];
        for (int v = 0; v < VECTORS; ++v) xv[v] = Load(xp + v * kLanes);
        for (int o = 0; o < CHANNELS; ++o)
          for (int v = 0; v < VECTORS; ++v) acc[o][v] += xv[v] * kp[o];
      }
    }
  for (int o = 0; o < CHANNELS; ++o)
    for (int v = 0; v < VECTORS; ++v) Store(y + o * n + v * kLanes, acc[o][v]);
}

// All output channels of one pixel, CHANNELS at a time and the remainder.
template <int VECTORS>
void ForwardPixel(const Geometry& g, const float* x, const float* k, const float* bias, float* y,
                  int rows, int cols) {
  constexpr int kChannels = std::min(8, kAccumulators / VECTORS);
  int64_t o = 0;
  for (; o + kChannels <= g.o; o += kChannels)
    ForwardTile<kChannels, VECTORS>(g, x, k + o, bias + o, y + o * g.n, rows, cols);
  auto rest = [&]<int... R>(std::integer_sequence<int, R...>) {
    ((g.o - o == R + 1 ? ForwardTile<R + 1, VECTORS>(g, x, k + o, bias + o, y + o * g.n, rows, cols)
                       : void()),
     ...);
  };
  rest(std::make_integer_sequence<int, kChannels - 1>{});
}

// Output pixels of units [begin, end), a unit being (batch block, pixel).
void ForwardUnits(const Geometry& g, const float* x, const float* k, const float* bias, float* y,
                  int64_t pad_top, int64_t pad_left, int64_t begin, int64_t end) {
  const int64_t pixels = g.out_h * g.out_w;
  for (int64_t unit = begin; unit < end; ++unit) {
    const int64_t block = unit / pixels, i = unit % pixels / g.out_w, j = unit % g.out_w;
    const int64_t top = i - pad_top, left = j - pad_left;  // x's row and column of tap (0, 0)
    const int64_t row_begin = std::max<int64_t>(0, -top), col_begin = std::max<int64_t>(0, -left);
    const int64_t row_end = std::min(g.kh, g.h - top), col_end = std::min(g.kw, g.w - left);
    const int vectors = g.Vectors(block);
    const int64_t lane = block * kMaxVectors * kLanes;
    float* yp = y + (i * g.out_w + j) * g.YColumn() + lane;
    if (row_begin >= row_end || col_begin >= col_end) {  // Every tap in the padding.
      for (int64_t o = 0; o < g.o; ++o)
        for (int v = 0; v < vectors; ++v) Store(yp + o * g.n + v * kLanes, Vec{} + bias[o]);
      continue;
    }
    const float* xp = x + (top + row_begin) * g.XRow() + (left + col_begin) * g.XColumn() + lane;
    const float* kp = k + (row_begin * g.kw + col_begin) * g.c * g.o;
    const int rows = row_end - row_begin, cols = col_end - col_begin;
    switch (vectors) {
      case 4: ForwardPixel<4>(g, xp, kp, bias, yp, rows, cols); break;
      case 3: ForwardPixel<3>(g, xp, kp, bias, yp, rows, cols); break;
      case 2: ForwardPixel<2>(g, xp, kp, bias, yp, rows, cols); break;
      default: ForwardPixel<1>(g, xp, kp, bias, yp, rows, cols);
    }
  }
}

// acc[TAPS][CHANNELS] += x at TAPS tap offsets times dy, over one output row's pixels;
// acc holds lane-wise partial sums, one vector per (tap, channel), row stride g.o.
template <int TAPS, int CHANNELS>
void KernelTile(const Geometry& g, const float* x, const float* dy, const int64_t* offsets,
                Vec* acc, int vectors) {
  const int64_t n = g.n, o_count = g.o, out_w = g.out_w, x_column = g.XColumn(), y_column = g.YColumn();
  int64_t offset[TAPS];
  for (int t = 0; t < TAPS; ++t) offset[t] = offsets[t];
  Vec sum[TAPS][CHANNELS];
  for (int t = 0; t < TAPS; ++t)
    for (int o = 0; o < CHANNELS; ++o) sum[t][o] = acc[t * o_count + o];
  for (int64_t j = 0; j < out_w; ++j)
    for (int v = 0; v < vectors; ++v) {
      const float* yp = dy + j * y_column + v * kLanes;
      const float* xp = x + j * x_column + v * kLanes;
      Vec d[CHANNELS];
      for (int o = 0; o < CHANNELS; ++o) {
        d[o] = Load(yp + o * n);
        Pin(d[o]);
      }
      for (int t = 0; t < TAPS; ++t) {
        const Vec xv = Load(xp + offset[t]);
        for (int o = 0; o < CHANNELS; ++o) sum[t][o] += xv * d[o];
      }
    }
  for (int t = 0; t < TAPS; ++t)
    for (int o = 0; o < CHANNELS; ++o) acc[t * o_count + o] = sum[t][o];
}

template <int TAPS>
void KernelTaps(const Geometry& g, const float* x, const float* dy, const int64_t* offsets,
                Vec* acc, int vectors) {
  constexpr int kChannels = 6;  // 4 taps x 6 channels: 24 sums, 6 dy vectors, 1 x vector.
  int64_t o = 0;
  for (; o + kChannels <= g.o; o += kChannels)
    KernelTile<TAPS, kChannels>(g, x, dy + o * g.n, offsets, acc + o, vectors);
  auto rest = [&]<int... R>(std::integer_sequence<int, R...>) {
    ((g.o - o == R + 1 ? KernelTile<TAPS, R + 1>(g, x, dy + o * g.n, offsets, acc + o, vectors)
                       : void()),
     ...);
  };
  rest(std::make_integer_sequence<int, kChannels - 1>{});
}

// Adds units [begin, end), a unit being (output row, batch block), to acc (taps x g.o) and
// dy's sums to bias_acc (g.o).
void KernelUnits(const Geometry& g, const float* x, const float* dy, Vec* acc, Vec* bias_acc,
                 int64_t begin, int64_t end) {
  constexpr int kTaps = 4;
  const int64_t taps = g.kh * g.kw * g.c;
  std::vector<int64_t> offsets(taps);  // Of each tap (a, b, c) from x's pixel of output (i, j).
  for (int64_t a = 0; a < g.kh; ++a)
    for (int64_t b = 0; b < g.kw; ++b)
      for (int64_t c = 0; c < g.c; ++c)
        offsets[(a * g.kw + b) * g.c + c] = a * g.XRow() + b * g.XColumn() + c * g.n;
  for (int64_t unit = begin; unit < end; ++unit) {
    const int64_t i = unit / g.BatchBlocks(), block = unit % g.BatchBlocks();
    const int64_t lane = block * kMaxVectors * kLanes;
    const float* xp = x + i * g.XRow() + lane;
    const float* yp = dy + i * g.out_w * g.YColumn() + lane;
    const int vectors = g.Vectors(block);
    for (int64_t o = 0; o < g.o; ++o) {
      Vec sum = bias_acc[o];
      for (int64_t j = 0; j < g.out_w; ++j)
        for (int v = 0; v < vectors; ++v) sum += Load(yp + j * g.YColumn() + o * g.n + v * kLanes);
      bias_acc[o] = sum;
    }
    int64_t t = 0;
    for (; t + kTaps <= taps; t += kTaps)
      KernelTaps<kTaps>(g, xp, yp, offsets.data() + t, acc + t * g.o, vectors);
    for (; t < taps; ++t) KernelTaps<1>(g, xp, yp, offsets.data() + t, acc + t * g.o, vectors);
  }
}

// Runs task(0..tasks-1) on XLA's thread pool, then finish(), then completes the future.
ffi::Future RunTasks(ffi::ThreadPool& pool, int64_t tasks, std::function<void(int64_t)> task,
                     std::function<void()> finish) {
  struct Job {
    std::function<void(int64_t)> task;
    std::function<void()> finish;
    std::atomic<int64_t> remaining;
    ffi::Promise promise;
  };
  auto job = std::make_shared<Job>();
  job->task = std::move(task);
  job->finish = std::move(finish);
  job->remaining = tasks;
  ffi::Future future(job->promise);
  if (tasks == 0) {  // An empty output.
    job->finish();
    job->promise.SetAvailable();
  }
  for (int64_t i = 0; i < tasks; ++i)
    pool.Schedule([job, i] {
      job->task(i);
      if (job->remaining.fetch_sub(1) == 1) {
        job->finish();
        job->promise.SetAvailable();
      }
    });
  return future;
}

// Tasks for `units` units of work: a few per thread, none for no work, fewer where each
// needs `bytes_per_task` of scratch.
int64_t Tasks(ffi::ThreadPool& pool, int64_t units, int64_t bytes_per_task = 0) {
  int64_t tasks = std::max<int64_t>(1, pool.num_threads()) * kTasksPerThread;
  if (bytes_per_task) tasks = std::min(tasks, std::max<int64_t>(1, kPartialBytes / bytes_per_task));
  return std::min(tasks, units);
}

ffi::Future Forward(ffi::ThreadPool pool, F32 x, F32 k, F32 bias, ffi::ResultBuffer<ffi::F32> y,
                    int64_t pad_top, int64_t pad_left) {
  const Geometry g = Shapes(x.dimensions(), k.dimensions(), y->dimensions());
  const float* xp = x.typed_data();
  const float* kp = k.typed_data();
  const float* bp = bias.typed_data();
  float* yp = y->typed_data();
  const int64_t units = g.BatchBlocks() * g.out_h * g.out_w, tasks = Tasks(pool, units);
  return RunTasks(
      pool, tasks,
      [=](int64_t task) {
        ForwardUnits(g, xp, kp, bp, yp, pad_top, pad_left, units * task / tasks,
                     units * (task + 1) / tasks);
      },
      [] {});
}

// The lane-wise partial sums of `tasks` tasks, `size` vectors each, summed into out.
void SumPartials(const Vec* partial, int64_t tasks, int64_t stride, int64_t size, float* out) {
  for (int64_t i = 0; i < size; ++i) {
    Vec total = Vec{};
    for (int64_t task = 0; task < tasks; ++task) total += partial[task * stride + i];
    float sum = 0;
    for (int lane = 0; lane < kLanes; ++lane) sum += total[lane];
    out[i] = sum;
  }
}

ffi::Future KernelBackward(ffi::ThreadPool pool, F32 x, F32 dy, ffi::ResultBuffer<ffi::F32> dk,
                           ffi::ResultBuffer<ffi::F32> dbias) {
  const Geometry g = Shapes(x.dimensions(), dk->dimensions(), dy.dimensions());
  const float* xp = x.typed_data();
  const float* yp = dy.typed_data();
  float* kernel_out = dk->typed_data();
  float* bias_out = dbias->typed_data();
  const int64_t size = g.kh * g.kw * g.c * g.o, stride = size + g.o;
  const int64_t units = g.out_h * g.BatchBlocks();
  const int64_t tasks = Tasks(pool, units, stride * static_cast<int64_t>(sizeof(Vec)));
  // Per task, lane-wise partial sums: one vector per kernel weight, then one per bias.
  auto partial = std::make_shared<std::vector<Vec>>(tasks * stride, Vec{});
  return RunTasks(
      pool, tasks,
      [=](int64_t task) {
        Vec* acc = partial->data() + task * stride;
        KernelUnits(g, xp, yp, acc, acc + size, units * task / tasks, units * (task + 1) / tasks);
      },
      [=] {
        SumPartials(partial->data(), tasks, stride, size, kernel_out);
        SumPartials(partial->data() + size, tasks, stride, g.o, bias_out);
      });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnLabBatchMinorConvForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Ret<F32>()
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnLabBatchMinorConvKernelBackward, KernelBackward,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>().Arg<F32>().Ret<F32>().Ret<F32>());
