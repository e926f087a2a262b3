"""The label stage ③ (`can label`): a scores table (or an existing pairs dataset) and its certificate in, a
`PreferenceSet` out. `LabelConfig` holds the defaults `can label` shows; the CLI and the demos call `run`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from train.scorers import scorer_field


@dataclass
class LabelConfig:
    scores: str  # a scores table, or a pairs dataset (PKU-SafeRLHF's or TRL's layout)
    certificate: str  # the certificate `can dual` wrote for it
    out: str = "preferences.parquet"  # .parquet, or a folder (a `datasets` directory)
    mode: str = "bt"  # bt, soft or hard
    pairs_per_prompt: int = 1
    seed: int = 0
    prompt_col: str = "prompt"
    response_col: str = "response"
    check_hash: bool = True  # refuse a certificate made for another table
    check_solution: bool = True  # refuse a λ that is not the dual's solution on the table (an edited certificate)
    scorer: list = field(default_factory=list)  # pairs: NAME=SPEC for scores the pairs lack
    scorer_template: str = scorer_field("template")
    scorer_dtype: str = scorer_field("dtype")
    scorer_max_length: int | None = scorer_field("max_length")
    scorer_batch_size: int = scorer_field("batch_size")


def run(cfg: LabelConfig):
    """Labels and writes the pairs (atomically); returns (PreferenceSet, stats). Stats are `LabelStats` for a
    scores table and `PairsStats` for a relabelled pairs dataset."""
    from bridge.certificate import Certificate
    from bridge.labels import pseudo_preferences
    from bridge.pairs import looks_like_pairs
    from train.prompts import ensure_dir

    cert = Certificate.read(cfg.certificate)
    out = Path(cfg.out)
    if out.suffix == ".parquet" and out.is_dir():
        from can_jax.errors import OutputError

        raise OutputError(f"cannot write {out}: it is a folder")
    ensure_dir(out.parent)  # an output that cannot be written is refused before the work
    if looks_like_pairs(cfg.scores, cfg.response_col):
        from train.relabel import relabel_pairs
        from train.scorers import scorer_options

        opts = scorer_options(cfg.scorer_template, cfg.scorer_dtype, cfg.scorer_max_length, cfg.scorer_batch_size)
        prefs, stats = relabel_pairs(cfg.scores, cert, cfg.mode, cfg.seed, list(cfg.scorer), opts)
    else:
        prefs, stats = pseudo_preferences(cfg.scores, cert, cfg.mode, cfg.pairs_per_prompt, cfg.seed, cfg.prompt_col,
                                          cfg.response_col, cfg.check_hash, cfg.check_solution)  # fmt: skip
    try:
        prefs.write(out)
    except OSError as err:  # a `datasets` directory is written by `datasets`, which raises plain OSErrors
        from bridge.files import path_problem
        from can_jax.errors import OutputError

        raise OutputError(f"cannot write {out}: {path_problem(out, err)}") from None
    return prefs, stats
