// The C side of mlaan-accel: libtorch's thread-local autocast state, memory formats, the
// global cuDNN/TF32 switches, device streams and events, and the caching allocator's
// statistics, behind a flat C API. Only device-generic c10/ATen interfaces are used
// (c10::Stream, c10::Event, the DeviceGuardImpl registry, c10::DeviceAllocator), so no CUDA
// header is needed; the CUDA implementations are found at run time in libc10_cuda.
//
// Every function that can fail catches every C++ exception and hands its message back through
// `err` (a malloc'd string the caller frees with ma_free): an exception that crossed into Rust
// would abort the process. Tensors arrive as the `at::Tensor*` a tch `Tensor` points to.
#include "bridge_guard.h"

#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/Tensor.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace {

using bridge::dup;
using bridge::guarded;

// 0 = CPU, 1 = CUDA: the only device types the project runs on.
c10::DeviceType device_type(int kind) {
    return kind == 1 ? c10::DeviceType::CUDA : c10::DeviceType::CPU;
}

// 0 = float32, 1 = bfloat16, 2 = float16.
c10::ScalarType scalar_type(int dtype) {
    switch (dtype) {
        case 1:
            return c10::ScalarType::BFloat16;
        case 2:
            return c10::ScalarType::Half;
        default:
            return c10::ScalarType::Float;
    }
}

c10::Device cuda(int index) {
    return c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(index));
}

// CUDA's lazy initialisation, which sizes the caching allocator's per-device statistics:
// before it, asking for them throws "Invalid device argument ... did you call init?".
// Idempotent and cheap once done (what the first CUDA tensor would do).
c10::DeviceAllocator* cuda_allocator() {
    at::globalContext().lazyInitDevice(c10::DeviceType::CUDA);
    return c10::getDeviceAllocator(c10::DeviceType::CUDA);
}

}  // namespace

extern "C" {

void ma_free(void* p) { std::free(p); }

// Autocast on this thread for `kind`'s device type, to `dtype`. The cast cache is switched
// off: it lives for the thread, and a cached bf16 copy of a weight would outlive the
// optimizer step that changed the weight (PyTorch clears it when the outermost autocast
// context exits; a stage thread never exits its context).
int ma_autocast_set(int kind, int enabled, int dtype, char** err) {
    return guarded<int>(err, -1, [&]() {
        auto t = device_type(kind);
        at::autocast::set_autocast_enabled(t, enabled != 0);
        if (enabled != 0) {
            at::autocast::set_autocast_dtype(t, scalar_type(dtype));
        }
        at::autocast::set_autocast_cache_enabled(false);
        at::autocast::clear_cache();
        return 0;
    });
}

int ma_autocast_enabled(int kind) { return at::autocast::is_autocast_enabled(device_type(kind)) ? 1 : 0; }

// A channels-last copy of a 4-d tensor (the tensor itself when it already is one).
void* ma_channels_last(void* tensor, char** err) {
    return guarded<void*>(err, nullptr, [&]() -> void* {
        const at::Tensor& t = *static_cast<at::Tensor*>(tensor);
        return new at::Tensor(t.contiguous(at::MemoryFormat::ChannelsLast));
    });
}

// Re-lay a 4-d parameter out channels-last in place of its data, as `module.to(memory_format=
// torch.channels_last)` does: the variable (and its autograd identity) stays the same.
int ma_set_data_channels_last(void* tensor, char** err) {
    return guarded<int>(err, -1, [&]() {
        at::Tensor& t = *static_cast<at::Tensor*>(tensor);
        if (t.dim() == 4) {
            t.set_data(t.detach().contiguous(at::MemoryFormat::ChannelsLast));
        }
        return 0;
    });
}

int ma_is_channels_last(void* tensor) {
    const at::Tensor& t = *static_cast<at::Tensor*>(tensor);
    return t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) ? 1 : 0;
}

// cuDNN's autotuner and TF32 in cuBLAS and cuDNN: process-wide switches.
int ma_set_cuda_math(int cudnn_benchmark, int tf32, char** err) {
    return guarded<int>(err, -1, [&]() {
        auto& ctx = at::globalContext();
        ctx.setBenchmarkCuDNN(cudnn_benchmark != 0);
        ctx.setAllowTF32CuBLAS(tf32 != 0);
        ctx.setAllowTF32CuDNN(tf32 != 0);
        return 0;
    });
}

int ma_cuda_math(int* cudnn_benchmark, int* tf32) {
    auto& ctx = at::globalContext();
    *cudnn_benchmark = ctx.benchmarkCuDNN() ? 1 : 0;
    *tf32 = ctx.allowTF32CuBLAS() ? 1 : 0;
    return 0;
}

// A new stream from libtorch's pool for CUDA device `index`, as an opaque c10::Stream.
void* ma_stream_from_pool(int index, char** err) {
    return guarded<void*>(err, nullptr, [&]() -> void* {
        c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
        return new c10::Stream(impl.getStreamFromGlobalPool(cuda(index), false));
    });
}

// The calling thread's current stream on CUDA device `index`.
void* ma_stream_current(int index, char** err) {
    return guarded<void*>(err, nullptr, [&]() -> void* {
        c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
        return new c10::Stream(impl.getStream(cuda(index)));
    });
}

// Make `stream` the calling thread's current stream on its device.
int ma_stream_make_current(void* stream, char** err) {
    return guarded<int>(err, -1, [&]() {
        const c10::Stream& s = *static_cast<c10::Stream*>(stream);
        c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
        impl.exchangeStream(s);
        return 0;
    });
}

int64_t ma_stream_id(void* stream) { return static_cast<c10::Stream*>(stream)->id(); }

int ma_stream_synchronize(void* stream, char** err) {
    return guarded<int>(err, -1, [&]() {
        static_cast<c10::Stream*>(stream)->synchronize();
        return 0;
    });
}

void ma_stream_free(void* stream) { delete static_cast<c10::Stream*>(stream); }

// An event recorded on the calling thread's current stream of CUDA device `index`: everything
// queued there so far happens before whatever a stream that waits on it queues next.
void* ma_event_record(int index, char** err) {
    return guarded<void*>(err, nullptr, [&]() -> void* {
        c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
        auto* ev = new c10::Event(c10::DeviceType::CUDA);
        try {
            ev->record(impl.getStream(cuda(index)));
        } catch (...) {
            delete ev;
            throw;
        }
        return ev;
    });
}

// Make the calling thread's current stream of CUDA device `index` wait for `event`.
int ma_event_block(void* event, int index, char** err) {
    return guarded<int>(err, -1, [&]() {
        c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
        static_cast<c10::Event*>(event)->block(impl.getStream(cuda(index)));
        return 0;
    });
}

void ma_event_free(void* event) { delete static_cast<c10::Event*>(event); }

// 1 when the work before `event` is done, 0 when not yet, -1 on an error.
int ma_event_query(void* event, char** err) {
    return guarded<int>(err, -1, [&]() { return static_cast<c10::Event*>(event)->query() ? 1 : 0; });
}

// The calling thread's current stream of CUDA device `index`, as the CUDA runtime's handle
// (`cudaStream_t`; null is the legacy default stream): what a library that queues its own
// kernels (NCCL) needs to queue them in order with libtorch's.
void* ma_stream_native(int index, char** err) {
    return guarded<void*>(err, nullptr, [&]() -> void* {
        c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
        return impl.getStream(cuda(index)).native_handle();
    });
}

// Make CUDA device `index` the calling thread's current device (cudaSetDevice), as a library
// that creates its own CUDA objects (an NCCL communicator) for "the current device" needs.
int ma_cuda_set_device(int index, char** err) {
    return guarded<int>(err, -1, [&]() {
        c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
        impl.setDevice(cuda(index));
        return 0;
    });
}

// Tell the caching allocator that `tensor`'s memory is used on the calling thread's current
// stream: its block is not reused until the work queued there so far is done.
int ma_record_stream(void* tensor, char** err) {
    return guarded<int>(err, -1, [&]() {
        const at::Tensor& t = *static_cast<at::Tensor*>(tensor);
        if (!t.defined() || !t.is_cuda() || !t.has_storage()) {
            return 0;
        }
        c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
        impl.recordDataPtrOnStream(t.storage().data_ptr(), impl.getStream(t.device()));
        return 0;
    });
}

// The caching allocator's current and peak allocated and reserved bytes on CUDA device
// `index` (what torch.cuda.memory_allocated / max_memory_allocated / memory_reserved /
// max_memory_reserved report).
int ma_cuda_memory(int index, int64_t* out4, char** err) {
    return guarded<int>(err, -1, [&]() {
        auto stats = cuda_allocator()
                         ->getDeviceStats(static_cast<c10::DeviceIndex>(index));
        const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
        out4[0] = stats.allocated_bytes[all].current;
        out4[1] = stats.allocated_bytes[all].peak;
        out4[2] = stats.reserved_bytes[all].current;
        out4[3] = stats.reserved_bytes[all].peak;
        return 0;
    });
}

int ma_cuda_reset_peak(int index, char** err) {
    return guarded<int>(err, -1, [&]() {
        cuda_allocator()->resetPeakStats(static_cast<c10::DeviceIndex>(index));
        return 0;
    });
}

// Hand every cached, unused block back to the driver (torch.cuda.empty_cache), so that the
// next reserved peak counts only what is allocated from now on.
int ma_cuda_empty_cache(char** err) {
    return guarded<int>(err, -1, [&]() {
        cuda_allocator()->emptyCache();
        return 0;
    });
}

}  // extern "C"
