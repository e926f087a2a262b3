"""Processes (DESIGN §6): every stage runs under `accelerate launch`, on any number of processes, CPU or GPU.

Work comes in fixed units (collection shards, blocks of rows, chunks of prompts) whose seeds belong to the unit,
never to a rank: unit u is owned by rank u mod world, so the ranks' sets are disjoint and cover the units, and any
number of processes computes exactly what one process computes. Only the main process writes shared files.
Outside `accelerate launch` this is one process, rank 0 of 1.
"""

from __future__ import annotations


def state():
    """accelerate's PartialState (initialises the process group under `accelerate launch`). Without a GPU the
    processes talk through gloo: accelerate only does that when told `cpu=True` (its `--cpu` launcher alone starts
    a single process unless MPI is installed; `accelerate launch --multi_gpu --num_processes N` on a CPU machine
    starts N processes that land here)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def owned(n_units: int, rank: int, world: int) -> list[int]:
    """The units of `rank`: u ≡ rank (mod world). Disjoint across ranks, their union all units."""
    units = list(range(rank, n_units, world))
    assert all(u % world == rank for u in units)  # ownership is a partition of range(n_units)
    return units


def device(st) -> str | None:
    """The device this process works on: its GPU under accelerate, else CPU (None: the model's default)."""
    import torch

    if torch.cuda.is_available():
        return str(st.device)
    return None


def gather(st, items: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank (picklable objects)."""
    if st.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object

    return gather_object(items)


def by_unit(gathered: list[tuple[int, object]]) -> list:
    """Results of (unit, value) pairs gathered from all ranks, in unit order; every unit exactly once."""
    units = [u for u, _ in gathered]
    if sorted(units) != list(range(len(units))):
        raise RuntimeError(f"units computed more than once or not at all: {sorted(units)}")
    return [v for _, v in sorted(gathered, key=lambda uv: uv[0])]


def map_units(st, n_units: int, fn) -> list:
    """[fn(u) for u in range(n_units)], each unit computed by the rank that owns it, the results on every rank."""
    mine = [(u, fn(u)) for u in owned(n_units, st.process_index, st.num_processes)]
    return by_unit(gather(st, mine))


def claim(st, folder, names: list[str], legacy=None) -> None:
    """`bridge.owned.claim` under several processes: every rank checks that `can` may replace `names` in
    `folder`, then the main process marks them, after a barrier (no rank reads a half-made decision)."""
    from bridge.owned import claim as check

    check(folder, names, legacy=legacy, write=False)
    st.wait_for_everyone()
    if st.is_main_process:
        check(folder, names, legacy=legacy)
    st.wait_for_everyone()


def shared(st, make):
    """What the main process makes, handed to every process (accelerate's `broadcast_object_list`): an artifact
    computed once (a round's certificate, a dual) instead of once per rank or through a file. `make()` runs on the
    main process alone; a `CanError` it raises is raised on every rank, so none waits for an object that never comes."""
    from can_jax.errors import CanError

    if st.num_processes == 1:
        return make()
    from accelerate.utils import broadcast_object_list

    box = [None]
    if st.is_main_process:
        try:
            box[0] = ("ok", make())
        except CanError as err:
            box[0] = ("error", err)
    broadcast_object_list(box, from_process=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def keep_freed_memory() -> bool:
    """Sets glibc's allocator to serve every allocation from its heap and keep freed memory there. By default glibc
    hands blocks above its mmap threshold (at most 32 MB) to the kernel as fresh mappings and unmaps them on free; a
    DPO step allocates and frees hundreds of MB of activations and logit tiles, so every step had the kernel fault
    that memory in and zero it again (docs/RESULTS.md, "The demo's time and the kernel's share"). The process then
    holds its peak, which it reaches anyway.
    Called by the `can` command at start; a script that runs the stages itself may call it first. A C library other
    than glibc (musl, macOS) is left as it is: returns whether the settings were made."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 — glibc's own symbol: the option numbers below are glibc's
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
    return all(mallopt(option, value) == 1 for option, value in
               ((m_mmap_max, 0), (m_trim_threshold, 2**31 - 1), (m_top_pad, 256 << 20)))  # fmt: skip
