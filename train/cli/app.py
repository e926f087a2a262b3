"""The one `can` app and what its commands share: option types, the one-line failure, JAX set-up, the certificate
table (DESIGN §5). Commands live one stage per module in this package and register on `app` when the package is
imported; nothing here imports them, so there is no import loop. `--num-processes` re-launches a command
(`train.cli.launch`).

Heavy modules (JAX, later torch) are imported inside the commands, so `can --help` is instant and `can dual`
never imports torch. User mistakes end as one `error: …` line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import enum
import math
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from can_jax.errors import Outcome


class _CanGroup(TyperGroup):
    """Every command's `CanError` ends as one `error: …` line and exit 1, never a traceback; with
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
            fail(err, json_out="--json" in args, status=err.outcome)  # the status a --json consumer sees
        except Exception as err:
            # typer vendors click from 0.29 on: recognise its UsageError (and subclasses) by name.
            if "--json" in args and any(c.__name__ == "UsageError" for c in type(err).__mro__):
                echo_json({"status": Outcome.USAGE_ERROR.value, "message": one_line(err.format_message()),
                           "converged": False})  # fmt: skip
            raise  # click prints the usage and exits with its own code, ExitCode.USAGE_ERROR


COMMAND_LINE: list[str] = []  # this process's arguments after the program name, as the group parsed them

SEED_MAX = 2**32 - 1  # numpy's and torch's seeding both take 0 … 2³² − 1
# Counts and limits that must be positive wherever a command takes them, and those that may be 0.
POSITIVE = {"k", "max_new_tokens", "batch_size", "shard_size", "max_length", "scorer_max_length", "scorer_batch_size",
            "train_top", "epochs", "lr", "responses", "pairs_per_prompt", "max_iter", "chunk", "prompts",
            "num_processes", "test_k", "gen_batch_size"}  # fmt: skip
NON_NEGATIVE = {"rounds", "refine"}
# Parameters that name what a command reads, and the folder outputs (a run folder rather than one file).
INPUTS = ("prompts", "scores", "table", "preferences", "certificate", "certificate_or_prompts", "policy", "aligned",
          "reference", "train_scores", "test_prompts", "config")  # fmt: skip
FOLDER_OUTPUTS = {"train", "prealign", "evaluate", "refine", "demo"}
FOLDER_REPLACING = {"label"}  # file-output commands whose output may be a folder they replace as a whole


class _CanCommand(TyperCommand):
    """Checks the inputs every command shares before its body runs, with one line each: seeds and counts in range,
    an output that is not an input (nor a folder holding one), a file output that replaces only what `can` wrote,
    and a run folder that is not a file."""

    def invoke(self, ctx):
        labels = {p.name: max(p.opts, key=len) if p.param_type_name == "option" else p.name.upper()
                  for p in self.params}  # fmt: skip
        check_params(self.name, ctx.params, labels)
        return super().invoke(ctx)


def check_params(command: str, params: dict, labels: dict | None = None) -> None:
    """`_CanCommand`'s checks on a command's parsed parameters; `labels` name them as the user typed them."""
    from can_jax.errors import InvalidArgumentError, OutputError

    labels = labels or {}

    def label(name: str) -> str:
        return labels.get(name, "--" + name.replace("_", "-"))

    for name, value in params.items():
        opt = label(name)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if name == "seed" or name.endswith("_seed"):
            if not 0 <= value <= SEED_MAX:
                raise InvalidArgumentError(f"{opt} must be a whole number from 0 to 2**32 - 1, got {value}")
        elif name in POSITIVE and not value > 0:
            raise InvalidArgumentError(f"{opt} must be positive, got {value}")
        elif name in NON_NEGATIVE and not value >= 0:
            raise InvalidArgumentError(f"{opt} must be 0 or more, got {value}")
    from bridge.owned import check_not_inputs, is_png, replaceable

    inputs = [(label(n), params.get(n)) for n in INPUTS]
    plot = params.get("plot")
    if plot is not None and not params.get("no_plot"):
        check_not_inputs([(label("plot"), plot)], inputs)
        if os.path.lexists(plot) and not is_png(plot):
            raise OutputError(f"{label('plot')} {plot} exists and is not a PNG image: it is not replaced; choose "
                              "another path for the plot")  # fmt: skip
    out = params.get("out")
    if out is None:
        return
    if command in FOLDER_OUTPUTS:
        if Path(out).exists() and not Path(out).is_dir():
            raise OutputError(f"{label('out')} {out} is a file; {command} writes a folder there: choose another")
        check_not_inputs([(label("out"), out)], [(n, v) for n, v in inputs if not _inside(v, out)])
    else:
        outputs = [(label("out"), out)] + ([(label("out"), f"{out}.shards")] if command == "collect" else [])
        check_not_inputs(outputs, inputs)
        # A folder in the way of a file output is refused by the atomic writer, after the result; only `label`
        # replaces a folder (a `datasets` preference set), so only there must the folder be one `can` wrote.
        if not replaceable(out) and not (Path(out).is_dir() and command not in FOLDER_REPLACING):
            raise OutputError(f"{label('out')} {out} exists and was not written by can: it is not replaced; choose "
                              "another output path (or remove it yourself)")  # fmt: skip


def _inside(value, folder) -> bool:
    """Whether an input lies strictly inside a run folder (a run's own policy, a demo's own table): the folder's
    writers check the entries they replace (`bridge.owned.claim`)."""
    from bridge.files import resolved

    if value is None or not isinstance(value, (str, os.PathLike)) or not os.path.lexists(value):
        return False
    return resolved(folder) in resolved(value).parents


class _CanTyper(typer.Typer):
    """Every command is a `_CanCommand`."""

    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or _CanCommand, **kwargs)


app = _CanTyper(
    cls=_CanGroup,
    name="can",
    help="One-shot safety alignment by optimal dualization (CAN, arXiv 2405.19544).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class ExitCode(enum.IntEnum):
    """Every exit status of `can`, in one table (README, Troubleshooting, lists the same)."""

    OK = 0
    USER_ERROR = 1  # the one `error: …` line: bad input, a refused option or output, infeasible margins, …
    USAGE_ERROR = 2  # click's own code for an unknown option or a missing argument; named here, not set
    NOT_CONVERGED = 3  # `can dual`: the solve stopped short of its tolerance (the certificate says why)
    SIGNAL = 128  # the base: a launched process killed by signal N ends the launch with 128 + N, as a shell says


# The libraries whose own output — deprecation warnings, progress bars of weight loading and of `datasets`
# map/filter/save, loading reports, accelerate's and DDP's notices — is hidden unless --verbose. Our own
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
        warnings.formatwarning = lambda message, *_, **__: f"warning: {one_line(message)}\n"
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


def fail(message, code: int = ExitCode.USER_ERROR, json_out: bool = False, status: Outcome | str = Outcome.ERROR):
    """One `error: …` line on stderr and exit `code`; with --json also {status, message} on stdout. `status` is an
    `Outcome` or its string: one outside the enumeration raises, so --json never prints a status scripts cannot
    know."""
    status = Outcome(status)
    message = one_line(message)
    # One error line per run, as in one process: RANK (torchrun's) is read from the environment, so that a failure
    # before torch is imported needs no process group.
    if os.environ.get("RANK", "0") == "0":
        if json_out:
            echo_json({"status": status.value, "message": message, "converged": False})
        typer.echo(f"error: {message}", err=True)
    raise typer.Exit(int(code))


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
        fail(f"--beta must be a positive finite number, got {beta}", json_out=json_out, status=Outcome.INVALID)


def load_limited(scores, reward, constraint, cost, prompt_id, float32, drop_bad_rows, cost_at_most=(), at_least=()):
    """`bridge.dual.load_table`, with absolute limits (--cost-at-most/--at-least) turned into margins as `can dual`
    does (a user error ends the command through the group: its one line, or JSON status)."""
    from bridge.dual import load_table
    from bridge.limits import apply_limits, limit_specs

    specs, limits = limit_specs(list(cost_at_most or []), list(at_least or []))
    loaded = load_table(scores, reward, constraint, cost, prompt_id, float32, drop_bad_rows, extra_specs=specs)
    return apply_limits(loaded, limits)[0]


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
