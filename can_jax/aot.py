"""The dual's programs kept between processes: `jax.export` of a jitted function, cached on disk by its exact
argument shapes, so that a second `can dual` on a table of the same shape does not trace the solve again (and JAX's
persistent compilation cache skips XLA's compilation). Tracing the solve with its standard errors and the bias took
~0.5 s of every `can dual`; a cached entry is read in milliseconds. Lowering the exported program into the call
still costs what lowering did. (Keeping the compiled executable instead, `jax.experimental.serialize_executable`,
would skip that too, but its executables crashed the process on first use here with jax 0.10.2 on CPU.)

**On wherever the persistent cache is on; `CAN_EXPORT_CACHE=0` turns it off alone.** It was opt-in for a while:
long pytest processes with it on segfaulted inside XLA. The cause was not this cache: the process had run out of
memory mappings (`vm.max_map_count`), because loops in `can_jax` recompiled on every call. Since they compile
once, a full test run with both caches on in its own process (`CAN_NO_CACHE=0 CAN_EXPORT_CACHE=1 python -m pytest`,
2026-12-05) passed at 7,159 mappings at most. Within a process an entry is read once and the same `Exported`
object is called again (the newest 32 are kept), so JAX compiles it once.

The cache lives beside JAX's persistent compilation cache (`<jax_compilation_cache_dir>/exports`) and is used only
where that cache is on (the CLI turns it on; `--no-cache` turns both off). An entry is keyed by the function, the
JAX and jaxlib versions, the machine, the x64 flag, the source of `can_jax` and the arguments' tree, shapes, dtypes
and static options: any change makes a new entry, never a stale call. Calls under a trace, or with more than one
device, go straight to the jitted function; so does any failure to export, read or write an entry.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import tempfile
from pathlib import Path

import jax
import numpy as np

from can_jax.packed import FAST_MATH

FORMAT = 1  # bump when the entry layout changes
_LOADED: dict[Path, tuple] = {}  # entries read or made in this process, by path (the newest LOADED_MAX)
LOADED_MAX = 32


def cache_dir() -> Path | None:
    """Where exported programs are kept: `exports/` in JAX's persistent compilation cache directory, or None when
    that cache is off."""
    base = jax.config.jax_compilation_cache_dir
    if not base or os.environ.get("CAN_EXPORT_CACHE", "1") == "0":
        return None
    return Path(base) / "exports"


@functools.lru_cache(maxsize=1)
def _source_digest() -> str:
    """SHA-256 of every Python file of can_jax: an entry made by other code is never called."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _machine() -> str:
    """The host and device an entry was made on (an entry made on another machine sharing the cache directory is
    not used: its program was lowered for that machine's devices)."""
    import platform

    dev = jax.devices()[0]
    flags = ""
    try:
        flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return "|".join([platform.machine(), platform.node(), dev.platform, dev.device_kind,
                     getattr(dev.client, "platform_version", ""), hashlib.sha256(flags.encode()).hexdigest()])


def _key(name: str, tree, leaves, static: dict) -> str:
    import jaxlib

    parts = [
        f"format={FORMAT}",
        name,
        jax.__version__,
        jaxlib.__version__,
        jax.default_backend(),
        _machine(),
        str(jax.config.jax_enable_x64),
        _source_digest(),
        str(tree),
        repr([(tuple(x.shape), str(x.dtype)) for x in leaves]),
        repr(sorted((k, repr(v)) for k, v in static.items())),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:40]


def _write(path: Path, blob: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def call(name: str, fn, *args, static: dict | None = None, **kwargs):
    """`fn(*args, **kwargs, **static)` for a jit-able `fn`, through the export cache when it is on.

    `static` holds the options `fn` needs as Python values (jit's static arguments: part of the key); `args` and
    `kwargs` are pytrees of arrays or numbers, passed as traced arguments. The result is the same pytree `fn`
    returns, computed by the same lowered program.
    """
    static = dict(static or {})
    leaves, tree = jax.tree.flatten((args, kwargs))
    where = cache_dir()
    if (where is None or static.get("devices", 1) != 1 or jax.device_count() != 1
            or any(isinstance(x, jax.core.Tracer) for x in leaves)):  # fmt: skip
        return fn(*args, **kwargs, **static)
    leaves = [x if isinstance(x, jax.Array) else np.asarray(x) for x in leaves]
    path = where / f"{name}-{_key(name, tree, leaves, static)}.jaxexport"
    entry = _LOADED.get(path) or _read(path)
    if entry is None:
        try:
            entry = _export(fn, tree, leaves, static)
        except Exception:  # noqa: BLE001 — a program that cannot be exported is run as it is
            return fn(*args, **kwargs, **static)
        try:
            _write(path, pickle.dumps({"out_tree": entry[0], "exported": bytes(entry[1].serialize())}))
        except Exception:  # noqa: BLE001 — a read-only or full cache only costs the tracing next time
            pass
    _LOADED.pop(path, None)
    _LOADED[path] = entry  # the same Exported object on the next call: JAX compiles it once per process
    while len(_LOADED) > LOADED_MAX:
        _LOADED.pop(next(iter(_LOADED)))
    out_tree, exported = entry[:2]
    if len(entry) == 2:  # compiled with the options of `packed.fast_jit` (JAX takes them only at the top)
        entry = _LOADED[path] = (out_tree, exported, jax.jit(exported.call, compiler_options=FAST_MATH))
    return jax.tree.unflatten(out_tree, entry[2](*leaves))


def _read(path: Path):
    """(out tree, Exported) of a cached entry, or None when there is none or it cannot be read."""
    if not path.is_file():
        return None
    try:
        blob = pickle.loads(path.read_bytes())
        return blob["out_tree"], jax.export.deserialize(bytearray(blob["exported"]))
    except Exception:  # noqa: BLE001 — a damaged or foreign entry is replaced, never trusted
        return None


def _export(fn, tree, leaves, static: dict):
    """(out tree, Exported) of `fn` at these argument shapes, taking and returning flat leaves."""
    holder = {}

    def flat(*xs):
        args, kwargs = jax.tree.unflatten(tree, xs)
        out, holder["out_tree"] = jax.tree.flatten(fn(*args, **kwargs, **static))
        return out

    flat.__name__ = flat.__qualname__ = getattr(fn, "__name__", "flat")  # what JAX's logs name
    specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
    exported = jax.export.export(jax.jit(flat))(*specs)
    return holder["out_tree"], exported
