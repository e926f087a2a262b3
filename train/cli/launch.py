"""`can COMMAND … --num-processes N / --accelerate-config FILE`: the command re-launches itself under accelerate's
launcher, as `trl dpo` does, so users never type `accelerate launch -m …` (which breaks in any folder that holds
its own `train.py`).

The launcher runs the script file `train/cli/entry/can_entry.py` (never `-m`) with the same arguments. The children
carry `CAN_LAUNCHED`, so they run the command instead of launching again; only the main process reports an error,
and the parent exits with the main process's exit code, silently: the one `error: …` line is the child's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

LAUNCHED = "CAN_LAUNCHED"


def launched() -> bool:
    """True in a process started by `can --num-processes` (or by any torchrun-style launcher)."""
    return os.environ.get(LAUNCHED) == "1" or "WORLD_SIZE" in os.environ


def launch_if_asked(num_processes: int | None, accelerate_config: Path | None) -> None:
    """Returns when this process should run the command itself; otherwise runs it under accelerate's launcher and
    ends this process with the main child's exit code."""
    from train.cli.app import COMMAND_LINE, fail  # COMMAND_LINE: this process's arguments, as the group read them

    if accelerate_config is not None and not accelerate_config.is_file():
        fail(f"--accelerate-config {accelerate_config}: no such file (write one with `accelerate config`)")
    if launched():
        world = os.environ.get("WORLD_SIZE")
        if num_processes is not None and world is not None and int(world) != num_processes:
            fail(f"--num-processes {num_processes}, but this command already runs in {world} processes (started by "
                 "another launcher): leave --num-processes out, or run `can` directly")  # fmt: skip
        return
    if accelerate_config is None and (num_processes is None or num_processes == 1):
        return
    code = _launch(num_processes, accelerate_config, list(COMMAND_LINE) or sys.argv[1:])
    raise typer.Exit(int(code))


def _launch_args(num_processes: int | None, accelerate_config: Path | None) -> list[str]:
    """accelerate's launcher options. Without a config: N processes on this machine, one per GPU, or over gloo
    on a CPU machine (`--multi_gpu` starts N CPU processes there; accelerate's `--cpu` would start one); mixed
    precision stays off at the launcher because the DPO precision is `can`'s own option."""
    if accelerate_config is not None:
        args = ["--config_file", str(accelerate_config)]
        return args + ([] if num_processes is None else ["--num_processes", str(num_processes)])
    args = ["--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no"]  # fmt: skip
    return args + (["--multi_gpu"] if num_processes > 1 else [])


def _launch(num_processes: int | None, accelerate_config: Path | None, argv: list[str]) -> int:
    import logging
    import subprocess

    from train.cli.app import ExitCode

    try:
        from accelerate.commands.launch import launch_command, launch_command_parser
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    except ImportError:
        from train.cli.app import fail

        fail("--num-processes needs accelerate and torch: pip install 'can-align[train]'")

    if "--verbose" not in argv:
        # torch's elastic agent logs each child's failure and its notices; the main child's one line says it all.
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("torch.distributed"):
                logging.getLogger(name).setLevel(logging.CRITICAL)

    script = Path(__file__).resolve().parent / "entry" / "can_entry.py"
    args = launch_command_parser().parse_args([*_launch_args(num_processes, accelerate_config), str(script), *argv])
    os.environ[LAUNCHED] = "1"
    try:
        launch_command(args)
    except subprocess.CalledProcessError as err:
        return _exit_code(err.returncode)
    except ChildFailedError as err:
        failures = err.failures
        if not failures:
            return ExitCode.USER_ERROR
        if 0 not in failures:
            # Only the main process reports errors; when it did not fail, say which one did.
            rank = min(failures)
            typer.echo(f"error: process {rank} failed (exit code {_exit_code(failures[rank].exitcode)}) while the "
                       "main process did not report an error: rerun with --verbose to see its output", err=True)
        return _main_exit_code(failures)
    except ValueError as err:  # accelerate's own refusal of its options (e.g. a config it cannot read)
        from train.cli.app import fail

        fail(f"accelerate refused the launch: {err}")
    finally:
        os.environ.pop(LAUNCHED, None)
    return ExitCode.OK


def _main_exit_code(failures: dict) -> int:
    """The exit code of one process for a failed launch: the main process's own, unless the launcher stopped it
    (a signal) after another process failed first; then the first failure's that ended by itself."""
    main = failures.get(0)
    if main is not None and main.exitcode > 0:
        return main.exitcode
    exited = sorted((f for f in failures.values() if f.exitcode > 0), key=lambda f: f.timestamp)
    return exited[0].exitcode if exited else _exit_code(min(failures.items())[1].exitcode)


def _exit_code(code: int) -> int:
    """A child's exit status as this process's: a signal's as 128 + its number, as a shell reports it."""
    from train.cli.app import ExitCode

    return ExitCode.SIGNAL - code if code < 0 else code
