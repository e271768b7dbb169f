"""dynseg.plugins: the native kernel library (C++17, and CUDA when built with nvcc) and where to find it.

The library is built by the package build (CMake through scikit-build-core) and installed next to
this file; its C ABI is `include/dynseg_crf.h`. `library_path()` is the one place that knows where
it lies, for ctypes (dynseg.sdk._native); `search_paths` also finds the TensorRT plugin beside it
(tensorrt/, built when TensorRT_ROOT names an installation) for dynseg.sdk.tensorrt_engine.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

LIBRARY_NAME = {"win32": "dynseg_crf.dll", "darwin": "libdynseg_crf.dylib"}.get(sys.platform, "libdynseg_crf.so")


def search_paths(name: str = LIBRARY_NAME, variable: str = "DYNSEG_LIBRARY") -> list[Path]:
    """Where a library the build installs here (the kernel library by default; the TensorRT plugin's
    for dynseg.sdk.tensorrt_engine) is looked for: $variable alone when it is set (a set variable that names
    no file is an error, not a quiet fall back to the installed library), else each folder of this
    package (an editable install keeps the built libraries in site-packages, apart from the sources)."""
    if os.environ.get(variable):
        return [Path(os.environ[variable])]
    paths = []
    folders = [Path(__file__).parent] + [Path(p) for p in sys.path if p]
    for folder in folders:
        candidate = folder / name if folder == Path(__file__).parent else folder / "dynseg" / "plugins" / name
        if candidate not in paths:
            paths.append(candidate)
    return paths


def library_path() -> Path:
    """The path of the native CRF library; FileNotFoundError lists every place searched."""
    paths = search_paths()
    for path in paths:
        if path.is_file():
            return path
    searched = "\n  ".join(str(p) for p in paths)
    raise FileNotFoundError(
        f"dynseg's native library {LIBRARY_NAME} was not found. Reinstall dynseg (pip install .) so that "
        f"CMake builds it, or point DYNSEG_LIBRARY at it. Searched:\n  {searched}"
    )
