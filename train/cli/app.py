"""The one `can` app and what its commands share: option types, the one-line failure, JAX set-up, the certificate
table (DESIGN §5). Commands live one stage per module in this package and register on `app` when the package is
imported; nothing here imports them, so there is no import loop. `--num-processes` re-launches a command
(`train.cli.launch`).

Heavy modules (JAX, later torch) are imported inside the commands, so `can --help` is instant and `can dual`
never imports torch. User mistakes end as one `error: …` line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup


class _CanGroup(TyperGroup):
    """Every command's `CanError` ends as one `error: …` line and exit 1, never a traceback (STYLE point 5); with
    --json a usage mistake still prints a JSON object with `status` and `message` on stdout. `--verbose` is taken
    anywhere on the line (`can collect … --verbose` as well as `can --verbose collect …`)."""

    def parse_args(self, ctx, args):
        args = list(args)
        end = args.index("--") if "--" in args else len(args)
        if "--verbose" in args[:end]:
            args.remove("--verbose")
            args.insert(0, "--verbose")
        COMMAND_LINE[:] = args  # what `--num-processes` re-launches (train.cli.launch)
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        from can_jax.errors import CanError

        args = [*getattr(ctx, "_protected_args", []), *ctx.args]
        try:
            return super().invoke(ctx)
        except CanError as err:
            if is_main_rank():
                typer.echo(f"error: {one_line(err)}", err=True)
            raise typer.Exit(EXIT_USER_ERROR) from None
        except Exception as err:
            # typer vendors click from 0.29 on: recognise its UsageError (and subclasses) by name.
            if "--json" in args and any(c.__name__ == "UsageError" for c in type(err).__mro__):
                echo_json({"status": "usage_error", "message": one_line(err.format_message()), "converged": False})
            raise


COMMAND_LINE: list[str] = []  # this process's arguments after the program name, as the group parsed them

app = typer.Typer(
    cls=_CanGroup,
    name="can",
    help="One-shot safety alignment by optimal dualization (CAN, arXiv 2405.19544).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

EXIT_USER_ERROR = 1
EXIT_NOT_CONVERGED = 3

# The libraries whose own output — deprecation warnings, progress bars of weight loading and of `datasets`
# map/filter/save, loading reports, accelerate's and DDP's notices — is hidden unless --verbose (issue 24). Our own
# lines, the progress bars of sampling/scoring and of DPO's steps, and the metric lines stay.
LIBRARIES = ("transformers", "trl", "peft", "accelerate", "datasets", "huggingface_hub", "torch", "jax", "jaxlib",
             "tokenizers", "pyarrow", "absl")  # fmt: skip
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "ACCELERATE_LOG_LEVEL": "error",
             "TORCH_CPP_LOG_LEVEL": "ERROR"}  # fmt: skip
_set_by_us: set[str] = set()


@app.callback()
def _options(
    verbose: Annotated[
        bool,
        typer.Option("--verbose", help="Show the libraries' own output (their warnings, progress bars and notices)."),
    ] = False,
):
    configure_output(verbose)


def configure_output(verbose: bool = False) -> None:
    """Quiet by default: the libraries' warnings, loggers below ERROR and progress bars off (through their
    environment variables for those not imported yet, their switches for those already imported: torch is never
    imported here); `verbose` turns them back on. Warnings of our own code print as one `warning: …` line."""
    import logging
    import sys
    import warnings

    if verbose:
        for key in _set_by_us:
            os.environ.pop(key, None)
        _set_by_us.clear()
    else:
        for key, value in QUIET_ENV.items():
            if key not in os.environ:
                os.environ[key] = value
                _set_by_us.add(key)
        pattern = "^(" + "|".join(LIBRARIES) + r")(\.|$)"
        warnings.filterwarnings("ignore", module=pattern)
        warnings.formatwarning = _one_line_warning
    level = logging.WARNING if verbose else logging.ERROR
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(level)
    if "transformers" in sys.modules:
        from transformers.utils import logging as tlog

        (tlog.set_verbosity_warning if verbose else tlog.set_verbosity_error)()
        (tlog.enable_progress_bar if verbose else tlog.disable_progress_bar)()
    if "datasets" in sys.modules:
        import datasets

        (datasets.enable_progress_bars if verbose else datasets.disable_progress_bars)()
        datasets.logging.set_verbosity(level)
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

        (enable_progress_bars if verbose else disable_progress_bars)()


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {one_line(message)}\n"


ScoresArg = Annotated[
    Path,
    typer.Argument(
        help="Scores table (.parquet, .jsonl or .csv), one row per response: a prompt id column, the reward "
        "column and one column per constraint.",
        show_default=False,
    ),
]
RewardOpt = Annotated[str, typer.Option("--reward", "-r", help="Reward column (higher = more helpful).")]
ConstraintOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--constraint",
        "-c",
        help="COL=MARGIN: a utility column (higher = safer) and the improvement over the reference policy its "
        "mean must gain. Repeat for several constraints.",
        show_default=False,
    ),
]
CostOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--cost",
        help="COL=MARGIN: a cost column (lower = safer; negated on the way in) and the reduction of its mean "
        "that is required. Repeatable.",
        show_default=False,
    ),
]
BetaOpt = Annotated[float, typer.Option("--beta", "-b", help="KL weight β > 0 (the same β the DPO run uses).")]
PromptIdOpt = Annotated[str, typer.Option("--prompt-id", help="Prompt id column.")]
Float32Opt = Annotated[bool, typer.Option("--float32", help="Solve in float32 (default float64).")]
DropOpt = Annotated[
    bool, typer.Option("--drop-bad-rows", help="Drop rows with NaN/inf/missing scores instead of failing.")
]
ProcessesOpt = Annotated[
    Optional[int],
    typer.Option(
        "--num-processes",
        help="Run on N processes: one per GPU, or N CPU processes over gloo on a machine without GPUs (the command "
        "re-launches itself with accelerate's launcher) [default: 1, or the --accelerate-config file's].",
        show_default=False,
    ),
]
AccelerateConfigOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--accelerate-config",
        help="An accelerate config file (written by `accelerate config`; DDP, DeepSpeed or FSDP) to launch the "
        "processes with.",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the JSON certificate to stdout.")]
CostAtMostOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--cost-at-most",
        help="COL=d: an absolute limit, expected cost ≤ d (Safe-RLHF's form); the margin is E_ref[cost] − d on "
        "these samples. Repeatable.",
    ),
]
AtLeastOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--at-least",
        help="COL=τ: an absolute limit, expected utility ≥ τ; the margin is τ − E_ref[utility]. Repeatable.",
    ),
]


def one_line(message) -> str:
    return " ".join(str(message).split())


def echo_json(obj: dict):
    import json

    typer.echo(json.dumps(obj, indent=2, allow_nan=False))


def status_of(err) -> str:
    """The `status` a --json consumer sees for an error."""
    from can_jax.errors import InfeasibleMarginsError, InvalidArgumentError, OutputError, ScoresFormatError

    for cls, name in [(InfeasibleMarginsError, "infeasible"), (InvalidArgumentError, "invalid"),
                      (ScoresFormatError, "bad_input"), (OutputError, "output_error")]:  # fmt: skip
        if isinstance(err, cls):
            return name
    return "error"


def fail(message, code: int = EXIT_USER_ERROR, json_out: bool = False, status: str = "error"):
    """One `error: …` line on stderr and exit `code`; with --json also {status, message} on stdout."""
    message = one_line(message)
    if is_main_rank():
        if json_out:
            echo_json({"status": status, "message": message, "converged": False})
        typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def is_main_rank() -> bool:
    """False on the other processes of a launch (torchrun's RANK): one error line per run, as in one process. Read
    from the environment, so that a failure before torch is imported needs no process group."""
    return os.environ.get("RANK", "0") == "0"


def setup_jax(cache: bool = True):
    """float64 on (DESIGN §2) and, unless `cache` is off or CAN_NO_CACHE=1, JAX's persistent compilation cache in
    the user's cache directory ($CAN_CACHE_DIR, else ~/.cache/can/jax), before any array exists: a second run on a
    table of the same shape compiles nothing."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX may share a GPU with torch
    import jax

    jax.config.update("jax_enable_x64", True)
    if not cache or os.environ.get("CAN_NO_CACHE", "") not in ("", "0"):
        return
    path = Path(os.environ.get("CAN_CACHE_DIR", Path.home() / ".cache" / "can")) / "jax"
    try:
        path.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    except OSError:
        pass  # a read-only home only costs the compile time


def check_beta(beta: float, json_out: bool = False):
    if not (math.isfinite(beta) and beta > 0):
        fail(f"--beta must be a positive finite number, got {beta}", json_out=json_out, status="invalid")


def load_or_fail(scores, reward, constraint, cost, prompt_id, float32, drop_bad_rows, json_out: bool, cost_at_most=(),
                 at_least=()):  # fmt: skip
    """`bridge.dual.load_table`, with absolute limits (--cost-at-most/--at-least) turned into margins as `can dual`
    does; a user error ends the command with its one line (or JSON status)."""
    from bridge.dual import load_table
    from bridge.limits import apply_limits, limit_specs
    from can_jax.errors import CanError

    try:
        specs, limits = limit_specs(list(cost_at_most or []), list(at_least or []))
        loaded = load_table(scores, reward, constraint, cost, prompt_id, float32, drop_bad_rows, extra_specs=specs)
        return apply_limits(loaded, limits)[0]
    except CanError as err:
        fail(err, json_out=json_out, status=status_of(err))


def is_main_process() -> bool:
    """False on the other ranks of `accelerate launch`: they print nothing (one report per run)."""
    from train.dist import state

    return state().is_main_process


def console():
    """Rich console no narrower than the tables (a pipe or CI log otherwise truncates them to 80 columns)."""
    from rich.console import Console

    console = Console()
    return Console(width=max(console.width, 140)) if console.width < 140 else console


def print_certificate(cert, title: str):
    """A `Certificate` as a table of constraints and its summary lines (`Certificate.summary`)."""
    from rich.markup import escape
    from rich.table import Table

    rows, lines, warnings = cert.summary()
    out = console()
    table = Table(title=title)
    for col in ("constraint", "kind", "margin b", "λ*", "± s.e.", "active", "predicted gain", "reach"):
        table.add_column(col, justify="left" if col in ("constraint", "kind") else "right")
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))
    out.print(table)
    out.print(escape("\n".join(lines)))
    for note in warnings:
        out.print(f"[yellow]warning:[/yellow] {escape(note)}")
