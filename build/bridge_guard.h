// Shared by the C++ bridges (mlaan-dist's c10d bridge, mlaan-accel's compute bridge): no C++
// exception may cross into Rust, where it would abort the process. `guarded` runs a body and
// turns any exception into a malloc'd message in *err (the Rust side frees it) and a fallback
// result.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace bridge {

inline char* dup(const std::string& s) {
    char* out = static_cast<char*>(std::malloc(s.size() + 1));
    if (out != nullptr) {
        std::memcpy(out, s.c_str(), s.size() + 1);
    }
    return out;
}

template <typename T, typename F>
T guarded(char** err, T fallback, F&& f) {
    try {
        return f();
    } catch (const c10::Error& e) {
        // c10's what() carries a C++ backtrace; the message alone is what a user needs.
        if (err != nullptr) *err = dup(e.what_without_backtrace());
    } catch (const std::exception& e) {
        if (err != nullptr) *err = dup(e.what());
    } catch (...) {
        if (err != nullptr) *err = dup("unknown C++ exception");
    }
    return fallback;
}

}  // namespace bridge
