"""Builds dynseg's native library with its CUDA kernels emulated on the CPU (shim/cuda_runtime.h says
how and what that checks). The .cu files are compiled as C++ against the shim, after one rewrite:
each `kernel<<<grid, block[, shared[, stream]]>>>(args);` launch becomes an `emu::launch` call.

    python tests/cuda_emulation/emulator.py [--sanitize] [SOURCE_TREE] OUT.so

SOURCE_TREE (default: this checkout) holds plugins/, e.g. `git archive BRANCH plugins` unpacked, so a
kernel change can be checked on a machine without a GPU before a GPU session measures it. Load the
result with DYNSEG_LIBRARY=OUT.so. --sanitize builds it with AddressSanitizer and
UndefinedBehaviorSanitizer (scripts/cpu_sanitizers.sh).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

SHIM = Path(__file__).resolve().parent / "shim"
ROOT = Path(__file__).resolve().parents[2]
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)<<<(.*?)>>>\((.*?)\);", re.S)


def emulated_source(cuda_source: str) -> str:
    """The C++ for the emulator of one CUDA source file."""
    text = _LAUNCH.sub(lambda m: f"emu::launch([&] {{ {m.group(1)}({m.group(3)}); }}, {m.group(2)});", cuda_source)
    if "<<<" in text:
        raise ValueError("a kernel launch the emulator cannot rewrite: " + text[text.index("<<<") - 80:][:160])
    return text.replace("extern __shared__ float4 shared[];",
                        "float4* shared = reinterpret_cast<float4*>(emu::dynamic_shared.data());")


def build(tree: Path, out: Path, extra_sources: Sequence[Path] = (), include_dirs: Sequence[Path] = (),
          flags: Sequence[str] = ()) -> Path:
    """Compiles tree/plugins (CPU kernels as they are, CUDA kernels emulated) into the library `out`,
    with `extra_sources` (C++ against the same shim, e.g. the TensorRT plugin) and their `include_dirs`,
    and the compiler's `flags` besides the emulator's own."""
    compiler = shutil.which("g++")
    if compiler is None:
        raise FileNotFoundError("the CUDA emulator needs g++ (C++20, for <barrier>)")
    sources = tree / "plugins" / "src"
    with tempfile.TemporaryDirectory() as work:
        src = Path(work) / "src"
        (src / "cuda").mkdir(parents=True)
        for path in sources.glob("*"):
            if path.suffix in (".h", ".cpp") and path.name != "cuda_unavailable.cpp":
                shutil.copy(path, src / path.name)
        for path in (sources / "cuda").glob("*.cu*"):
            name = path.name if path.suffix == ".cuh" else path.stem + ".cpp"
            (src / "cuda" / name).write_text(emulated_source(path.read_text()))
        command = [
            compiler, "-std=c++20", "-O2", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-w",
            "-DDYNSEG_WITH_CUDA=1", '-DDYNSEG_VERSION="emulated"',
            '-DDYNSEG_CUDA_ARCHITECTURES_BUILT="no GPU (the CPU emulation)"', *flags,
            f"-I{SHIM}", f"-I{tree / 'plugins' / 'include'}", f"-I{src}", *(f"-I{d}" for d in include_dirs),
            *map(str, sorted(src.glob("*.cpp"))), *map(str, sorted((src / "cuda").glob("*.cpp"))),
            *map(str, extra_sources), "-o", str(out),
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"building the emulated library failed:\n{result.stderr[-4000:]}")
    return out


SANITIZERS = ("-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g")

if __name__ == "__main__":
    arguments = sys.argv[1:]
    sanitize = "--sanitize" in arguments
    arguments = [a for a in arguments if a != "--sanitize"]
    if len(arguments) not in (1, 2):
        sys.exit(__doc__)
    tree = Path(arguments[0]) if len(arguments) == 2 else ROOT
    print(build(tree, Path(arguments[-1]).resolve(), flags=SANITIZERS if sanitize else ()))
