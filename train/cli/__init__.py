"""The `can` command: one subcommand per stage (DESIGN §5), one module per stage, all registered on the one `app`
of `train.cli.app` when this package is imported."""

from train.cli import collect, dual, stability, label, train, evaluate, refine, demo  # noqa: F401, I001  (register, in stage order)
from train.cli.app import app

__all__ = ["app", "main"]


def main():
    from train.dist import keep_freed_memory

    keep_freed_memory()
    app()
