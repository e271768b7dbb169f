// cpu_features.cpp: dynseg_cpu_missing, the instruction-set extensions the kernels were compiled to
// use (-march=native by default, plugins/CMakeLists.txt) that the running CPU lacks. A library built on
// one machine and copied to an older one would otherwise die of an illegal instruction in its first
// call; the Python loader and the TensorRT plugin's getCreators ask this first and refuse instead.
//
// This file is compiled with the library's flags, so the compiler's predefined macros name the
// extensions the kernels may use; the code is compiled for the baseline x86-64 (the target attribute),
// so that it runs on any x86-64 CPU. The CPU is asked through CPUID and XGETBV rather than
// __builtin_cpu_supports, whose list of names differs between compilers and versions (clang before 18
// knows no "f16c", gcc before 11 no "lzcnt"). The extensions checked are those a compiler emits on its
// own when vectorising and optimising; others (AES, SHA, AMX) are reached only through intrinsics,
// which the kernels do not use.
#include "dynseg_crf.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>

#include <cstddef>
#include <cstdint>

#define DYNSEG_BASELINE __attribute__((target("arch=x86-64")))

namespace {

struct Registers {
    uint32_t eax = 0, ebx = 0, ecx = 0, edx = 0;
};

// CPUID leaf `leaf`, subleaf `subleaf`: all zero where the CPU has no such leaf (no feature reported).
DYNSEG_BASELINE Registers cpuid(uint32_t leaf, uint32_t subleaf) {
    Registers r;
    // gcc declares the result unsigned, clang int
    if (static_cast<uint32_t>(__get_cpuid_max(leaf & 0x80000000u, nullptr)) < leaf) return r;
    __cpuid_count(leaf, subleaf, r.eax, r.ebx, r.ecx, r.edx);
    return r;
}

// The register state the operating system saves on a context switch (XCR0): vector registers it does
// not save cannot be used, whatever CPUID says.
DYNSEG_BASELINE uint64_t saved_state(const Registers& leaf1) {
    if (!(leaf1.ecx & (1u << 27))) return 0;  // OSXSAVE: no XGETBV
    uint32_t low = 0, high = 0;
    __asm__ volatile("xgetbv" : "=a"(low), "=d"(high) : "c"(0));
    return (uint64_t{high} << 32) | low;
}

// The names are appended by hand: with _FORTIFY_SOURCE (Ubuntu's gcc enables it), glibc's string
// functions are always-inline wrappers compiled for the library's target, which gcc refuses to inline
// into a baseline function.
struct Missing {
    char names[512] = "";
    size_t length = 0;

    DYNSEG_BASELINE void require(bool present, const char* name) {
        if (present) return;
        if (length > 0) append(' ');
        while (*name) append(*name++);
    }

    DYNSEG_BASELINE void append(char c) {
        if (length + 1 < sizeof(names)) names[length++] = c;  // names[length] stays the terminating zero
    }
};

#define DYNSEG_BIT(reg, bit) (((reg) >> (bit)) & 1u)

DYNSEG_BASELINE Missing detect() {
    const Registers leaf1 = cpuid(1, 0), leaf7 = cpuid(7, 0), leaf7_1 = cpuid(7, 1), extended = cpuid(0x80000001u, 0);
    const uint64_t state = saved_state(leaf1);
    const bool ymm = (state & 0x6) == 0x6;          // SSE and AVX state
    const bool zmm = ymm && (state & 0xE0) == 0xE0;  // and AVX-512's opmask and upper registers
    Missing missing;
    (void)leaf7, (void)leaf7_1, (void)extended, (void)zmm;  // unread where the kernels use no extension of theirs
#ifdef __SSE4_1__
    missing.require(DYNSEG_BIT(leaf1.ecx, 19), "sse4.1");
#endif
#ifdef __SSE4_2__
    missing.require(DYNSEG_BIT(leaf1.ecx, 20), "sse4.2");
#endif
#ifdef __POPCNT__
    missing.require(DYNSEG_BIT(leaf1.ecx, 23), "popcnt");
#endif
#ifdef __MOVBE__
    missing.require(DYNSEG_BIT(leaf1.ecx, 22), "movbe");
#endif
#ifdef __AVX__
    missing.require(DYNSEG_BIT(leaf1.ecx, 28) && ymm, "avx");
#endif
#ifdef __FMA__
    missing.require(DYNSEG_BIT(leaf1.ecx, 12) && ymm, "fma");
#endif
#ifdef __F16C__
    missing.require(DYNSEG_BIT(leaf1.ecx, 29) && ymm, "f16c");
#endif
#ifdef __LZCNT__
    missing.require(DYNSEG_BIT(extended.ecx, 5), "lzcnt");
#endif
#ifdef __BMI__
    missing.require(DYNSEG_BIT(leaf7.ebx, 3), "bmi");
#endif
#ifdef __BMI2__
    missing.require(DYNSEG_BIT(leaf7.ebx, 8), "bmi2");
#endif
#ifdef __AVX2__
    missing.require(DYNSEG_BIT(leaf7.ebx, 5) && ymm, "avx2");
#endif
#ifdef __AVX512F__
    missing.require(DYNSEG_BIT(leaf7.ebx, 16) && zmm, "avx512f");
#endif
#ifdef __AVX512DQ__
    missing.require(DYNSEG_BIT(leaf7.ebx, 17) && zmm, "avx512dq");
#endif
#ifdef __AVX512IFMA__
    missing.require(DYNSEG_BIT(leaf7.ebx, 21) && zmm, "avx512ifma");
#endif
#ifdef __AVX512CD__
    missing.require(DYNSEG_BIT(leaf7.ebx, 28) && zmm, "avx512cd");
#endif
#ifdef __AVX512BW__
    missing.require(DYNSEG_BIT(leaf7.ebx, 30) && zmm, "avx512bw");
#endif
#ifdef __AVX512VL__
    missing.require(DYNSEG_BIT(leaf7.ebx, 31) && zmm, "avx512vl");
#endif
#ifdef __AVX512VBMI__
    missing.require(DYNSEG_BIT(leaf7.ecx, 1) && zmm, "avx512vbmi");
#endif
#ifdef __AVX512VBMI2__
    missing.require(DYNSEG_BIT(leaf7.ecx, 6) && zmm, "avx512vbmi2");
#endif
#ifdef __GFNI__
    missing.require(DYNSEG_BIT(leaf7.ecx, 8), "gfni");
#endif
#ifdef __VAES__
    missing.require(DYNSEG_BIT(leaf7.ecx, 9) && ymm, "vaes");
#endif
#ifdef __VPCLMULQDQ__
    missing.require(DYNSEG_BIT(leaf7.ecx, 10) && ymm, "vpclmulqdq");
#endif
#ifdef __AVX512VNNI__
    missing.require(DYNSEG_BIT(leaf7.ecx, 11) && zmm, "avx512vnni");
#endif
#ifdef __AVX512BITALG__
    missing.require(DYNSEG_BIT(leaf7.ecx, 12) && zmm, "avx512bitalg");
#endif
#ifdef __AVX512VPOPCNTDQ__
    missing.require(DYNSEG_BIT(leaf7.ecx, 14) && zmm, "avx512vpopcntdq");
#endif
#ifdef __AVX512VP2INTERSECT__
    missing.require(DYNSEG_BIT(leaf7.edx, 8) && zmm, "avx512vp2intersect");
#endif
#ifdef __AVX512FP16__
    missing.require(DYNSEG_BIT(leaf7.edx, 23) && zmm, "avx512fp16");
#endif
#ifdef __AVXVNNI__
    missing.require(DYNSEG_BIT(leaf7_1.eax, 4) && ymm, "avxvnni");
#endif
#ifdef __AVX512BF16__
    missing.require(DYNSEG_BIT(leaf7_1.eax, 5) && zmm, "avx512bf16");
#endif
    return missing;
}

}  // namespace

// Computed once (a thread-safe static): concurrent first calls all read the finished list.
extern "C" DYNSEG_BASELINE const char* dynseg_cpu_missing(void) {
    static const Missing missing = detect();
    return missing.names;
}

#else
// Other architectures: -march=native there is the builder's business (the check is x86-64's).
extern "C" const char* dynseg_cpu_missing(void) { return ""; }
#endif
