// cuda_unavailable.cpp: the CUDA entry points of a library built without its CUDA kernels (no nvcc,
// one older than CUDA 11.8, or DYNSEG_CUDA=OFF). Each says so and how to get the real ones, so callers
// see a clear error instead of a missing symbol.
#include "boundary.h"
#include "dynseg_crf.h"

namespace {

dynseg_status not_built() {
    return dynseg::fail(DYNSEG_ERROR_NOT_SUPPORTED,
                        "this dynseg native library was built without CUDA (no nvcc, one older than CUDA 11.8, "
                        "or DYNSEG_CUDA=OFF): with the CUDA toolkit 11.8 or newer installed, reinstall dynseg "
                        "(pip install --force-reinstall --no-deps .) to build the GPU kernels");
}

}  // namespace

extern "C" {

int32_t dynseg_cuda_compiled(void) { return 0; }
const char* dynseg_cuda_build(void) { return ""; }
int32_t dynseg_cuda_device_count(void) { return 0; }

dynseg_status dynseg_crf_workspace_size_cuda(const dynseg_crf_problem*, int32_t, size_t*) { return not_built(); }
dynseg_status dynseg_crf_forward_cuda(const dynseg_crf_problem*, const float*, float*, void*, size_t, void*) {
    return not_built();
}
dynseg_status dynseg_crf_backward_cuda(const dynseg_crf_problem*, const float*, const float*, float*, float* const*,
                                       float*, void*, size_t, void*) {
    return not_built();
}
dynseg_status dynseg_crf_check_cuda(const void*, void*) { return not_built(); }
dynseg_status dynseg_crf_forward_cuda_from_host(const dynseg_crf_problem*, const float*, float*, int32_t) {
    return not_built();
}
dynseg_status dynseg_cuda_set_device(int32_t) { return not_built(); }
dynseg_status dynseg_cuda_get_device(int32_t*) { return not_built(); }
dynseg_status dynseg_cuda_malloc(size_t, void**) { return not_built(); }
dynseg_status dynseg_cuda_free(void*) { return not_built(); }
dynseg_status dynseg_cuda_memcpy(void*, const void*, size_t) { return not_built(); }
dynseg_status dynseg_cuda_stream_create(void**) { return not_built(); }
dynseg_status dynseg_cuda_stream_synchronize(void*) { return not_built(); }
dynseg_status dynseg_cuda_stream_destroy(void*) { return not_built(); }

}  // extern "C"
