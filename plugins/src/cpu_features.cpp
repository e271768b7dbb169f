// cpu_features.cpp: dynseg_cpu_missing, the instruction-set extensions the kernels were compiled to
// use (-march=native by default, plugins/CMakeLists.txt) that the running CPU lacks. A library built on
// one machine and copied to an older one would otherwise die of an illegal instruction in its first
// call; the Python loader asks this first and refuses with the list instead.
//
// This file is compiled with the library's flags, so the compiler's predefined macros name the
// extensions the kernels may use; the check itself is compiled for the baseline x86-64 (the target
// attribute), so that it runs on any x86-64 CPU. The extensions listed are those a compiler emits on
// its own when auto-vectorising and optimising; others (AES, SHA, AMX) are reached only through
// intrinsics, which the kernels do not use.
#include <cstring>

#include "dynseg_crf.h"

namespace {

char missing[512] = "";

}  // namespace

#if defined(__x86_64__) && defined(__GNUC__)
namespace {

__attribute__((target("arch=x86-64"))) void append(const char* name) {
    std::strncat(missing, missing[0] ? " " : "", sizeof(missing) - std::strlen(missing) - 1);
    std::strncat(missing, name, sizeof(missing) - std::strlen(missing) - 1);
}

}  // namespace

// One line per extension: checked only where the kernels were compiled to use it.
#define DYNSEG_REQUIRE(name) \
    if (!__builtin_cpu_supports(name)) append(name)

extern "C" __attribute__((target("arch=x86-64"))) const char* dynseg_cpu_missing(void) {
    __builtin_cpu_init();
    missing[0] = '\0';
#ifdef __SSE4_1__
    DYNSEG_REQUIRE("sse4.1");
#endif
#ifdef __SSE4_2__
    DYNSEG_REQUIRE("sse4.2");
#endif
#ifdef __POPCNT__
    DYNSEG_REQUIRE("popcnt");
#endif
#ifdef __AVX__
    DYNSEG_REQUIRE("avx");
#endif
#ifdef __AVX2__
    DYNSEG_REQUIRE("avx2");
#endif
#ifdef __FMA__
    DYNSEG_REQUIRE("fma");
#endif
#ifdef __F16C__
    DYNSEG_REQUIRE("f16c");
#endif
#ifdef __BMI__
    DYNSEG_REQUIRE("bmi");
#endif
#ifdef __BMI2__
    DYNSEG_REQUIRE("bmi2");
#endif
#ifdef __LZCNT__
    DYNSEG_REQUIRE("lzcnt");
#endif
#ifdef __MOVBE__
    DYNSEG_REQUIRE("movbe");
#endif
#ifdef __AVX512F__
    DYNSEG_REQUIRE("avx512f");
#endif
#ifdef __AVX512VL__
    DYNSEG_REQUIRE("avx512vl");
#endif
#ifdef __AVX512BW__
    DYNSEG_REQUIRE("avx512bw");
#endif
#ifdef __AVX512DQ__
    DYNSEG_REQUIRE("avx512dq");
#endif
#ifdef __AVX512CD__
    DYNSEG_REQUIRE("avx512cd");
#endif
#ifdef __AVX512VBMI__
    DYNSEG_REQUIRE("avx512vbmi");
#endif
#ifdef __AVX512VBMI2__
    DYNSEG_REQUIRE("avx512vbmi2");
#endif
#ifdef __AVX512IFMA__
    DYNSEG_REQUIRE("avx512ifma");
#endif
#ifdef __AVX512VNNI__
    DYNSEG_REQUIRE("avx512vnni");
#endif
#ifdef __AVX512BITALG__
    DYNSEG_REQUIRE("avx512bitalg");
#endif
#ifdef __AVX512VPOPCNTDQ__
    DYNSEG_REQUIRE("avx512vpopcntdq");
#endif
#ifdef __AVX512BF16__
    DYNSEG_REQUIRE("avx512bf16");
#endif
#ifdef __AVX512FP16__
    DYNSEG_REQUIRE("avx512fp16");
#endif
#ifdef __AVX512VP2INTERSECT__
    DYNSEG_REQUIRE("avx512vp2intersect");
#endif
#ifdef __AVXVNNI__
    DYNSEG_REQUIRE("avxvnni");
#endif
#ifdef __GFNI__
    DYNSEG_REQUIRE("gfni");
#endif
#ifdef __VAES__
    DYNSEG_REQUIRE("vaes");
#endif
#ifdef __VPCLMULQDQ__
    DYNSEG_REQUIRE("vpclmulqdq");
#endif
    return missing;
}
#else
// Other architectures: -march=native there is the builder's business (the check is x86-64's).
extern "C" const char* dynseg_cpu_missing(void) { return missing; }
#endif
