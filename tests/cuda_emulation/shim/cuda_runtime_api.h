// cuda_runtime_api.h for the CUDA emulator: TensorRT's headers include it; cuda_runtime.h holds it all.
#pragma once
#include "cuda_runtime.h"
