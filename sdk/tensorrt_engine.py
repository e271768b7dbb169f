"""What running a dynseg TensorRT engine needs, without torch and without the exporter: the
optimisation profile an engine was built with, its sidecar JSON (read, and checked against the running
TensorRT, GPU and plugin library), and the plugin library (found, version-checked, registered).
TensorRT itself is imported only through `import_tensorrt`, so everything here but the registration
runs and is tested anywhere. `dynseg.export.engine` builds the engines (and writes the sidecar) on top
of it; the tensorrt backend runs them. docs/tensorrt.md describes the workflow and its limits.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from dynseg.plugins import search_paths

from .errors import BackendError, InvalidArgumentError
from .graph import DEFAULT_ENGINE_DETECTIONS, DEFAULT_ENGINE_SIZES
from .graph import DOMAIN, OP_TYPE, OP_VERSION
from .checks import INT32_MAX, is_int

if TYPE_CHECKING:
    import tensorrt

__all__ = [
    "Profile",
    "EngineError",
    "EngineMismatchError",
    "make_profile",
    "sidecar_path",
    "read_sidecar",
    "check_sidecar",
    "plugin_library_path",
    "running_environment",
    "import_tensorrt",
    "register_plugin",
]

PLUGIN_NAMESPACE = DOMAIN
PLUGIN_VERSION = str(OP_VERSION)  # TensorRT's plugin versions are strings
PLUGIN_LIBRARY = "libdynseg_crf_tensorrt.so"
PLUGIN_LIBRARY_ENV = "DYNSEG_TENSORRT_PLUGIN"
SIDECAR_FORMAT = 1
# The CUDA kernels index with 32 bits: pixels x (colour channels + 3) x 32 and pixels x padded labels must
# stay below 2^31 (docs/crf.md §6); RGB images: at most 11,184,810 pixels.
_MAX_PIXELS = INT32_MAX // ((3 + 3) * 32)
_INSTALL_TENSORRT = (
    "TensorRT's Python package is not installed: install it from NVIDIA's index "
    "(`pip install tensorrt --extra-index-url https://pypi.nvidia.com`, matching your CUDA driver; see "
    "docs/tensorrt.md), build the plugin with TensorRT_ROOT set (`TensorRT_ROOT=/path/to/TensorRT pip install ."
    "`), or run the exported .onnx on the onnxruntime backend (`dynseg export --format onnx`), which needs neither"
)


class EngineError(BackendError):
    """TensorRT is missing, or an engine could not be built or does not match where it runs."""


class EngineMismatchError(EngineError):
    """An engine's sidecar does not match the running TensorRT, GPU or plugin library; the message says
    what to rebuild."""


# ---- the optimisation profile -------------------------------------------------------------------

MinOptMax = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
"""A graph input's (min, opt, max) shapes in an optimisation profile."""


@dataclass(frozen=True)
class Profile:
    """One optimisation profile: detections = (min, opt, max) D; sizes = (min, opt, max) image sizes,
    each (H, W) in pixels. Built by make_profile, which validates it."""

    detections: tuple[int, int, int]
    sizes: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]

    def shapes(self) -> dict[str, MinOptMax]:
        """The (min, opt, max) shape of each graph input: image (1, 3, H, W), boxes (D, 4), labels and
        scores (D,)."""
        (d0, d1, d2), (s0, s1, s2) = self.detections, self.sizes
        return {
            "image": ((1, 3, *s0), (1, 3, *s1), (1, 3, *s2)),
            "boxes": ((d0, 4), (d1, 4), (d2, 4)),
            "labels": ((d0,), (d1,), (d2,)),
            "scores": ((d0,), (d1,), (d2,)),
        }

    def to_json(self) -> dict:
        return {"detections": list(self.detections), "sizes": [list(s) for s in self.sizes]}

    @classmethod
    def from_json(cls, data: Mapping) -> Profile:
        return make_profile(tuple(data["detections"]), tuple(tuple(s) for s in data["sizes"]))

    def admits(self, detections: int, height: int, width: int) -> bool:
        """Whether an image of height x width with `detections` boxes is inside the profile."""
        (h0, w0), _, (h1, w1) = self.sizes
        return self.detections[0] <= detections <= self.detections[2] and h0 <= height <= h1 and w0 <= width <= w1


def make_profile(detections: Sequence[int] = DEFAULT_ENGINE_DETECTIONS,
                 sizes: Sequence[Sequence[int]] = DEFAULT_ENGINE_SIZES, *,
                 max_detections: int | None = None, labels: int | None = None) -> Profile:
    """Validates a profile: detections (min, opt, max) with 0 <= min <= opt <= max (and max <= the
    model's max_detections when given); sizes ((H, W) min, opt, max) with 1 <= min <= opt <= max in each
    of H and W and the largest image within the CUDA kernels' 32-bit indexing (with `labels`, the
    largest label count of a CRF, when given). Raises InvalidArgumentError naming the offending value."""
    # Python ints only: the profile goes into the sidecar's JSON as given
    if not isinstance(detections, (tuple, list)) or len(detections) != 3 \
            or not all(is_int(d, numpy=False) for d in detections):
        raise InvalidArgumentError(f"detections must be three ints (min, opt, max), got {detections!r}")
    low, opt, high = detections
    if low < 0:
        raise InvalidArgumentError(f"the minimum detection count must be >= 0, got {low}")
    if not low <= opt <= high:
        raise InvalidArgumentError(f"detections must satisfy min <= opt <= max, got {tuple(detections)}")
    if max_detections is not None and high > max_detections:
        raise InvalidArgumentError(
            f"the maximum detection count {high} exceeds the model's max_detections = {max_detections} "
            "(re-export with a larger --max-detections, or lower the profile's maximum)"
        )
    if not isinstance(sizes, (tuple, list)) or len(sizes) != 3 or not all(
            isinstance(s, (tuple, list)) and len(s) == 2 and all(is_int(v, numpy=False) for v in s) for s in sizes):
        raise InvalidArgumentError(f"sizes must be three (H, W) pairs of ints (min, opt, max), got {sizes!r}")
    smallest, optimum, largest = ((int(h), int(w)) for h, w in sizes)
    pairs = (smallest, optimum, largest)
    for (h, w), name in zip(pairs, ("minimum", "optimum", "maximum")):
        if h < 1 or w < 1:
            raise InvalidArgumentError(f"the {name} image size must be at least 1x1, got {h}x{w}")
    for axis, name in ((0, "height"), (1, "width")):
        values = [s[axis] for s in pairs]
        if not values[0] <= values[1] <= values[2]:
            raise InvalidArgumentError(f"the image {name} must satisfy min <= opt <= max, got {tuple(values)}")
    height, width = largest
    if height * width > _MAX_PIXELS:
        raise InvalidArgumentError(
            f"the maximum image size {height}x{width} ({height * width} pixels) is too large for the CUDA kernels "
            f"(at most {_MAX_PIXELS} pixels with an RGB image)"
        )
    padded = -(-max(high + 1, labels or 0) // 4) * 4  # the kernels' rows: whole float4s
    if height * width * padded > INT32_MAX:
        raise InvalidArgumentError(
            f"{height}x{width} pixels with up to {max(high + 1, labels or 0)} labels is too large for the CUDA "
            "kernels (pixels x labels must stay below 2^31): lower the maximum size or detections"
        )
    return Profile((low, opt, high), pairs)


# ---- the sidecar --------------------------------------------------------------------------------

def sidecar_path(plan: str | Path) -> Path:
    """Where the sidecar of a plan lives: the plan's path with ".json" appended (model.engine ->
    model.engine.json). The plan file itself holds TensorRT's bytes only."""
    plan = Path(plan)
    return plan.with_name(plan.name + ".json")


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_REQUIRED = ("format", "tensorrt_version", "compute_capability", "plugin_library", "plan_sha256", "profile",
             "precision", "dynseg_version", "dynseg_op_version", "class_names", "preprocessing")


def read_sidecar(plan_or_sidecar: str | Path) -> dict:
    """The sidecar of a plan (pass the plan or the .json), checked for its fields; raises EngineError
    when it is missing or malformed."""
    path = Path(plan_or_sidecar)
    if path.suffix != ".json":
        path = sidecar_path(path)
    if not path.is_file():
        raise EngineError(f"{path} is missing: an engine needs the sidecar JSON `dynseg export --format engine` "
                          "writes beside it; rebuild the engine")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:  # bad JSON or UTF-8, over-long integers, deep nesting
        raise EngineError(f"{path} is not valid UTF-8 JSON ({error}); rebuild the engine") from None
    missing = [key for key in _REQUIRED if key not in data] if isinstance(data, dict) else list(_REQUIRED)
    if missing:
        raise EngineError(f"{path} lacks {', '.join(missing)}; rebuild the engine")
    if data["format"] != SIDECAR_FORMAT:
        raise EngineError(f"{path} has sidecar format {data['format']!r}, this dynseg reads {SIDECAR_FORMAT!r}; "
                          "rebuild the engine with this dynseg")
    plugin, names = data["plugin_library"], data["class_names"]
    if not (isinstance(plugin, dict) and all(isinstance(plugin.get(k), str) for k in ("name", "sha256"))):
        raise EngineError(f"{path}: plugin_library must be {{'name': str, 'sha256': str}}, got {plugin!r}; "
                          "rebuild the engine")
    if not (isinstance(names, list) and names and all(isinstance(n, str) and n for n in names)):
        raise EngineError(f"{path}: class_names must be a non-empty list of names, got {names!r:.80}; rebuild the "
                          "engine")
    ceiling = data.get("score_ceiling", 1.0)  # absent from sidecars older than it: the default's 1
    if not (type(ceiling) in (int, float) and math.isfinite(ceiling) and ceiling > 0):
        raise EngineError(f"{path}: score_ceiling must be a finite number > 0, got {ceiling!r:.40}; rebuild the engine")
    try:
        Profile.from_json(data["profile"])  # validates
    except (KeyError, TypeError, ValueError) as error:  # InvalidArgumentError is a ValueError
        raise EngineError(f"{path}: its profile is malformed ({error!r}); rebuild the engine") from None
    return data


def check_sidecar(sidecar: Mapping, *, tensorrt_version: str, compute_capability: str,
                  plugin_sha256: str, plan: str | Path | None = None) -> None:
    """Checks an engine's sidecar against where it is about to run: the running TensorRT version, the GPU's
    compute capability, the sha256 of the plugin library that will be loaded, the plugin op version and,
    with `plan`, that the plan file is the one the sidecar describes. Raises EngineMismatchError listing
    every mismatch and what to rebuild."""
    problems = []
    rebuild_engine = ("rebuild the engine here (`dynseg export CHECKPOINT --format engine`), on this machine's "
                      "TensorRT and GPU")
    if str(sidecar["tensorrt_version"]) != str(tensorrt_version):
        problems.append(f"it was built with TensorRT {sidecar['tensorrt_version']}, but TensorRT {tensorrt_version} "
                        f"is running: {rebuild_engine}")
    if str(sidecar["compute_capability"]) != str(compute_capability):
        problems.append(f"it was built for a GPU of compute capability {sidecar['compute_capability']}, but this GPU "
                        f"is {compute_capability}: {rebuild_engine}")
    plugin = sidecar["plugin_library"]
    if plugin.get("sha256") != plugin_sha256:
        problems.append(f"it was built with another plugin library ({plugin.get('name')} sha256 "
                        f"{str(plugin.get('sha256'))[:12]}…, the loaded one is {plugin_sha256[:12]}…): rebuild the "
                        "engine with the installed dynseg, or reinstall the dynseg it was built with")
    if str(sidecar["dynseg_op_version"]) != PLUGIN_VERSION:
        problems.append(f"its CRF op is version {sidecar['dynseg_op_version']}, this plugin implements "
                        f"{PLUGIN_VERSION}: re-export the model and rebuild the engine")
    if plan is not None and sha256(plan) != sidecar["plan_sha256"]:
        problems.append(f"{plan} is not the plan this sidecar describes (its sha256 differs): rebuild the engine, "
                        "which writes both")
    if problems:
        raise EngineMismatchError("the engine does not match this machine: " + "; ".join(problems))


# ---- the running environment ------------------------------------------------------------------------

def plugin_library_path() -> Path:
    """The plugin library: $DYNSEG_TENSORRT_PLUGIN if set, else libdynseg_crf_tensorrt.so where the
    kernel library is looked for (dynseg.plugins.search_paths: the installed dynseg/plugins folder,
    site-packages' for an editable install). Raises EngineError listing the paths searched."""
    candidates = search_paths(PLUGIN_LIBRARY, PLUGIN_LIBRARY_ENV)
    for path in candidates:
        if path.is_file():
            return path
    raise EngineError(
        f"the TensorRT plugin library {PLUGIN_LIBRARY} was not found (searched: "
        f"{', '.join(str(p) for p in candidates)}): build dynseg with TensorRT, `TensorRT_ROOT=/path/to/TensorRT "
        f"pip install .`, or point {PLUGIN_LIBRARY_ENV} at the library"
    )


_lock = threading.Lock()  # the process's TensorRT state: its logger and the plugin's registration
_logger: Any = None


def tensorrt_logger(trt: ModuleType) -> Any:
    """The process's one trt.Logger, for every builder and runtime dynseg creates: TensorRT keeps a single
    logger while any of them exists and ignores, with a warning, the loggers of those created after the
    first, so a logger per object, freed with its object, could leave TensorRT logging through a freed one."""
    global _logger
    with _lock:
        if _logger is None:
            _logger = trt.Logger(trt.Logger.WARNING)
        return _logger


# The libraries this process loaded into TensorRT's global registry (trt.get_plugin_registry()). Paths, not
# registries: a registry's Python object keeps alive what it came from (a builder's, its builder).
_loaded_globally: set[Path] = set()


def register_plugin(registry: tensorrt.IPluginRegistry, library: Path, tensorrt_version: str, *,
                    process_wide: bool) -> None:
    """Makes dynseg's plugin creator known to TensorRT's plugin `registry` by loading `library` into it.

    process_wide=True: `registry` is TensorRT's global one (trt.get_plugin_registry(): the tensorrt
    backend's), which lives as long as the process; the library is loaded there once a process, since
    load_library fails, logging an error, for a library whose creators are already registered.
    process_wide=False: a registry that lives with its object (builder.get_plugin_registry(): build_engine's),
    loaded each time and not remembered, since holding its Python object would keep the builder alive.
    The creator is looked up after loading, so a refused load of a library already there (loaded by the
    application, say) counts as success; the registry is not asked first, as TensorRT logs an error for
    every creator it is asked for and lacks. Raises EngineError, before loading, for a library built for
    another major version than `tensorrt_version` (`check_plugin_major_version`), and when the creator is
    unknown after loading."""
    with _lock:
        if process_wide and library in _loaded_globally:
            return
        check_plugin_major_version(library, tensorrt_version)
        registry.load_library(str(library))
        if registry.get_creator(OP_TYPE, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None:
            # the library says why through the logger TensorRT handed it, or on stderr before it had one
            raise EngineError(f"TensorRT could not load the plugin library {library}, or it registered no "
                              f"{PLUGIN_NAMESPACE}::{OP_TYPE} version {PLUGIN_VERSION} (see TensorRT's log and "
                              "stderr above)")
        if process_wide:
            _loaded_globally.add(library)


def check_plugin_major_version(library: Path, tensorrt_version: str) -> None:
    """Raises EngineError when the plugin `library` was compiled against another TensorRT major version
    than `tensorrt_version`'s: their interfaces differ in layout and TensorRT does not check. Loaded
    anyway, the library would offer no plugin (its getCreators refuses) and say why on stderr only."""
    try:
        built = int(ctypes.CDLL(str(library)).dynseg_tensorrt_headers_major())
    except (OSError, AttributeError) as error:
        raise EngineError(f"{library} is not a dynseg TensorRT plugin library this dynseg can load ({error}): "
                          "rebuild it (TensorRT_ROOT=/path/to/TensorRT pip install .)") from None
    running = int(tensorrt_version.split(".")[0])
    if built != running:
        raise EngineError(f"the plugin library {library} was built against TensorRT {built}'s headers, and this "
                          f"is TensorRT {tensorrt_version}: rebuild it with TensorRT_ROOT naming this TensorRT "
                          "(docs/tensorrt.md)")


def import_tensorrt() -> ModuleType:
    """TensorRT's Python package, or EngineError saying how to install it."""
    try:
        import tensorrt  # noqa: PLC0415  (optional dependency, imported on use)
    except ImportError:
        raise EngineError(_INSTALL_TENSORRT) from None
    return tensorrt


def compute_capability(device: int = 0) -> str:
    """The compute capability ("major.minor") of CUDA device `device`, from the driver (libcuda)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        raise EngineError("the CUDA driver (libcuda.so.1) is not available: TensorRT engines need an NVIDIA GPU") \
            from None
    handle, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGet(ctypes.byref(handle), device) != 0:
        raise EngineError(f"CUDA device {device} is not available")
    # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76
    if cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, handle) != 0 or \
            cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, handle) != 0:
        raise EngineError(f"could not read the compute capability of CUDA device {device}")
    return f"{major.value}.{minor.value}"


def running_environment(plugin_library: str | Path | None = None, device: int = 0) -> dict[str, str]:
    """What check_sidecar compares against: the running TensorRT's version, the GPU's compute capability
    and the plugin library's sha256 (plugin_library, or plugin_library_path())."""
    tensorrt = import_tensorrt()
    library = Path(plugin_library) if plugin_library is not None else plugin_library_path()
    return {"tensorrt_version": tensorrt.__version__, "compute_capability": compute_capability(device),
            "plugin_sha256": sha256(library)}
