// The C side of mlaan-dist: c10d's TCPStore, PrefixStore and ProcessGroupGloo behind a flat C
// API. Every function catches every C++ exception and hands its message back through `err`
// (a malloc'd string the caller frees with md_free): an exception that crossed into Rust
// would abort the process. Tensors arrive as the `at::Tensor*` a tch `Tensor` points to.
#include "bridge_guard.h"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace {

using StorePtr = c10::intrusive_ptr<c10d::Store>;
using GroupPtr = c10::intrusive_ptr<c10d::ProcessGroupGloo>;

using bridge::dup;
using bridge::guarded;

// Wait for a collective; a failed or timed-out one rethrows its own exception.
void finish(const c10::intrusive_ptr<c10d::Work>& work) {
    work->wait();
}

}  // namespace

extern "C" {

void md_free(void* p) { std::free(p); }

// A TCPStore client (or, with is_server, the server and a client of it) on host:port. With
// `port` 0 and is_server the server picks a free port; md_store_port says which.
void* md_store_new(const char* host, uint16_t port, int is_server, int64_t timeout_ms, char** err) {
    return guarded<void*>(err, nullptr, [&]() -> void* {
        c10d::TCPStoreOptions opts;
        opts.port = port;
        opts.isServer = is_server != 0;
        opts.waitWorkers = false;
        opts.timeout = std::chrono::milliseconds(timeout_ms);
        auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
        return new StorePtr(store);
    });
}

int md_store_port(void* store) {
    auto* s = static_cast<StorePtr*>(store);
    auto* tcp = dynamic_cast<c10d::TCPStore*>(s->get());
    return tcp == nullptr ? -1 : tcp->getPort();
}

void md_store_free(void* store) { delete static_cast<StorePtr*>(store); }

// A second client connection to the same server (a thread that must not queue behind another
// thread's blocking wait takes its own).
void* md_store_clone(void* store, char** err) {
    return guarded<void*>(err, nullptr, [&]() -> void* {
        return new StorePtr((*static_cast<StorePtr*>(store))->clone());
    });
}

int md_store_set(void* store, const char* key, const uint8_t* data, size_t len, char** err) {
    return guarded<int>(err, -1, [&]() {
        std::vector<uint8_t> value(data, data + len);
        (*static_cast<StorePtr*>(store))->set(std::string(key), value);
        return 0;
    });
}

// The value of `key`, waiting up to timeout_ms for it to be set; malloc'd, length in *len.
uint8_t* md_store_get(void* store, const char* key, int64_t timeout_ms, size_t* len, char** err) {
    return guarded<uint8_t*>(err, nullptr, [&]() -> uint8_t* {
        auto& s = *static_cast<StorePtr*>(store);
        s->wait({std::string(key)}, std::chrono::milliseconds(timeout_ms));
        std::vector<uint8_t> value = s->get(std::string(key));
        *len = value.size();
        auto* out = static_cast<uint8_t*>(std::malloc(value.empty() ? 1 : value.size()));
        if (out == nullptr) throw std::bad_alloc();
        if (!value.empty()) std::memcpy(out, value.data(), value.size());
        return out;
    });
}

// 1 if `key` is set, 0 if not, -1 on error.
int md_store_check(void* store, const char* key, char** err) {
    return guarded<int>(err, -1, [&]() {
        return (*static_cast<StorePtr*>(store))->check({std::string(key)}) ? 1 : 0;
    });
}

// Atomically add `delta` to the counter `key`; returns the new value (INT64_MIN on error).
int64_t md_store_add(void* store, const char* key, int64_t delta, char** err) {
    return guarded<int64_t>(err, INT64_MIN, [&]() {
        return (*static_cast<StorePtr*>(store))->add(std::string(key), delta);
    });
}

// A Gloo process group of `world` ranks under `prefix` of the store. `address` is the local
// address (or, with is_interface, the network interface) its sockets bind to.
void* md_group_new(void* store, const char* prefix, int rank, int world, const char* address,
                   int is_interface, int64_t timeout_ms, char** err) {
    return guarded<void*>(err, nullptr, [&]() -> void* {
        // A connection of its own: a TCPStore client holds its lock through a blocking wait,
        // so groups forming at once on several threads of one process would otherwise wait
        // on each other's peers through one shared connection (and deadlock across ranks).
        auto prefixed = c10::make_intrusive<c10d::PrefixStore>(
            std::string(prefix), (*static_cast<StorePtr*>(store))->clone());
        auto opts = c10d::ProcessGroupGloo::Options::create(std::chrono::milliseconds(timeout_ms));
        std::string where(address);
        opts->devices.push_back(
            is_interface != 0 ? c10d::ProcessGroupGloo::createDeviceForInterface(where)
                              : c10d::ProcessGroupGloo::createDeviceForHostname(where));
        // One thread: a group serves one module's collectives, issued one at a time.
        opts->threads = 1;
        auto group = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, rank, world, opts);
        return new GroupPtr(group);
    });
}

void md_group_free(void* group) { delete static_cast<GroupPtr*>(group); }

// In-place sum over the group.
int md_group_all_reduce_sum(void* group, void* tensor, char** err) {
    return guarded<int>(err, -1, [&]() {
        std::vector<at::Tensor> ts{*static_cast<at::Tensor*>(tensor)};
        finish((*static_cast<GroupPtr*>(group))->allreduce(ts));
        return 0;
    });
}

// In-place broadcast from `root`.
int md_group_broadcast(void* group, void* tensor, int root, char** err) {
    return guarded<int>(err, -1, [&]() {
        std::vector<at::Tensor> ts{*static_cast<at::Tensor*>(tensor)};
        c10d::BroadcastOptions opts;
        opts.rootRank = root;
        finish((*static_cast<GroupPtr*>(group))->broadcast(ts, opts));
        return 0;
    });
}

// `output` (world × input's shape, contiguous) receives every rank's `input`, by rank.
int md_group_all_gather(void* group, void* input, void* output, char** err) {
    return guarded<int>(err, -1, [&]() {
        auto& g = *static_cast<GroupPtr*>(group);
        at::Tensor& in = *static_cast<at::Tensor*>(input);
        at::Tensor& out = *static_cast<at::Tensor*>(output);
        std::vector<at::Tensor> inputs{in};
        std::vector<std::vector<at::Tensor>> outputs(1);
        for (int r = 0; r < g->getSize(); ++r) outputs[0].push_back(at::empty_like(in));
        finish(g->allgather(outputs, inputs));
        for (int r = 0; r < g->getSize(); ++r) out.select(0, r).copy_(outputs[0][r]);
        return 0;
    });
}

int md_group_barrier(void* group, char** err) {
    return guarded<int>(err, -1, [&]() {
        finish((*static_cast<GroupPtr*>(group))->barrier());
        return 0;
    });
}

}  // extern "C"
