"""Atomic writes, content hashes and path spellings: a crash never leaves a half-written file behind, and two
spellings of one path (relative, `~`, symlinks) are one file.

A write that fails (a directory in the way, a file as a parent, a read-only disk, no space) raises `OutputError`
with one line naming the path; new files get the permissions the umask gives, as `open()` would.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from can_jax.errors import OutputError


def path_problem(path: str | os.PathLike, err: OSError | None = None) -> str:
    """Why `path` cannot be written or read, said of the path: "X is a file, not a folder" for a file where a folder
    is needed (which the OS calls "file exists" or "not a directory"), "it is a folder" for a folder where a file
    is needed, else the OS's reason in lower case ("permission denied", "no space left on device")."""
    path = Path(path)
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            return f"{parent} is a file, not a folder"
    if isinstance(err, FileExistsError) and path.exists() and not path.is_dir():
        return f"{path} is a file, not a folder"
    if isinstance(err, IsADirectoryError) or (err is None and path.is_dir()):
        return "it is a folder"
    if err is None:
        return "not found" if not path.exists() else "unknown reason"
    return (err.strerror or type(err).__name__).lower()


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only set-and-return)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes `data` to a temp file beside `path`, fsyncs it, then renames it over `path`."""
    path = Path(path)
    tmp = None
    try:
        if path.is_dir():
            raise IsADirectoryError(21, "is a folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            # mkstemp makes the file 0600; a file written by open() would get 0666 minus the umask.
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {path_problem(path, err)}") from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_parquet(path: str | os.PathLike, table) -> Path:
    """Writes a pyarrow Table (its schema metadata included) as Parquet, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return atomic_write_bytes(path, sink.getvalue().to_pybytes())


def pyplot():
    """matplotlib.pyplot on the Agg backend (plots are written to files; no display is needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_figure(path: str | os.PathLike, fig, dpi: int = 100) -> Path:
    """Lays out a matplotlib figure, saves it as PNG atomically and closes it."""
    import io

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def honour_umask(folder: str | os.PathLike) -> None:
    """Gives the files under `folder` the permissions `open()` gives under the process umask. Weight writers that
    go through a private temporary file (safetensors) leave 0600 behind, which a user sharing a group folder does
    not expect."""
    mode = 0o666 & ~_umask()
    for f in Path(folder).rglob("*"):
        if f.is_file() and not f.is_symlink() and (f.stat().st_mode & 0o777) != mode:
            try:
                os.chmod(f, mode)
            except OSError:
                pass  # a file of someone else's: left as it is


def resolved(path: str | os.PathLike) -> Path:
    """`path` with `~`, `.`, `..`, symlinks and the working directory resolved: two spellings of one file agree."""
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as err:  # a symlink loop, an unreadable component
        raise OutputError(f"cannot resolve {path}: {err}") from None


def spelled(path) -> str:
    """How a run records a model or file it was given: the resolved path when it exists (so that the same command
    run from another folder, or with an absolute path, names the same thing), else the text (a Hub id, 'smollm2')."""
    text = str(path)
    return str(resolved(text)) if text and os.path.exists(text) else text


def same_location(a, b) -> bool:
    """Whether two recorded spellings name the same model or file: equal texts, or paths resolving to one place."""
    if a is None or b is None:
        return a is b
    if str(a) == str(b):
        return True
    return os.path.exists(str(a)) and os.path.exists(str(b)) and resolved(str(a)) == resolved(str(b))
