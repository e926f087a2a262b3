"""`can label --pairs`: an existing pairwise dataset relabelled with λ* (`bridge.pairs`), its missing
scores computed by the scorers — those the certificate records (`scorers`: spec, template, sign), or those given
with `-s NAME=SPEC`, which must then match the certificate's names and recorded specs and templates."""

from __future__ import annotations

import os

from can_jax.errors import CanError


def scorer_specs(cert, given: list[str] | None, needed: list[str], columns=(), layout: str = "pku") -> dict[str, dict]:
    """name → {"spec", "template"} for the scores to compute, checked against the certificate's record; `columns`
    (the pairs') name a near miss when a score has neither columns nor a scorer."""
    from train.scorers import parse_scorer

    recorded = cert.scorers
    names = {n for n, _ in cert.score_weights()}
    out = {}
    for text in given or []:
        name, spec = parse_scorer(text)
        if name not in names:
            raise CanError(f"scorer {name!r} is not in the certificate (it has {sorted(names)})")
        rec = recorded.get(name)
        if rec is not None and rec.get("spec") not in (None, spec):
            raise CanError(f"scorer {name!r}: {spec!r} differs from the certificate's {rec['spec']!r} (the scores "
                           "λ* was solved on must be the scores relabelled)")  # fmt: skip
        out[name] = {"spec": spec, "template": (rec or {}).get("template")}
    for name in needed:
        if name in out:
            continue
        rec = recorded.get(name)
        if rec is None or not rec.get("spec"):
            from bridge.pairs import score_columns

            want = score_columns(name, layout)
            near = _near(want, columns)
            raise CanError(f"no scores for {name!r}: the pairs have no columns {want[0]!r} and {want[1]!r}{near}, and "
                           f"the certificate records no scorer for it; add them or give -s {name}=SPEC")  # fmt: skip
        out[name] = {"spec": rec["spec"], "template": rec.get("template")}
    return out


def relabel_pairs(pairs_path: str | os.PathLike, cert, mode: str = "soft", seed: int = 0,
                  scorers: list[str] | None = None, scorer_options: dict | None = None):  # fmt: skip
    """(PreferenceSet, stats): the pairs relabelled from r + λ*ᵀg under a `Certificate`, missing scores computed."""
    import numpy as np

    from bridge.pairs import LAYOUTS, completion_text, missing_scores, pairs_meta, read_pairs, relabel
    from bridge.preferences import PreferenceSet
    from train.tokens import check_prompt

    table, layout = read_pairs(pairs_path)
    needed = missing_scores(table, layout, cert)
    specs = scorer_specs(cert, scorers, needed, table.column_names, layout)
    scores = {}
    if specs:
        from train.scorers import make_scorer

        prompts = [check_prompt(p, f"{pairs_path} row {i}") for i, p in enumerate(table.column("prompt").to_pylist())]
        a_col, b_col, _, _ = LAYOUTS[layout]
        sides = [[completion_text(c) for c in table.column(col).to_pylist()] for col in (a_col, b_col)]
        opts = dict(scorer_options or {})
        for name, rec in specs.items():
            if "template" in opts and rec.get("template") and _is_model_template(rec["template"]):
                if opts["template"] != rec["template"]:
                    raise CanError(f"scorer {name!r}: --scorer-template {opts['template']!r} differs from the "
                                   f"certificate's {rec['template']!r}")  # fmt: skip
            template = rec["template"] if rec.get("template") and "template" not in opts else None
            kw = {**opts, **({"template": template} if template and _is_model_template(template) else {})}
            sc = make_scorer(name, rec["spec"], **kw)
            scores[name] = (np.asarray(sc(prompts, sides[0])), np.asarray(sc(prompts, sides[1])))
    out, stats = relabel(table, layout, cert, mode, seed, scores, where=str(pairs_path))
    record = {**pairs_meta(mode, seed, pairs_path), "layout": layout,
              "scored_by": {n: r["spec"] for n, r in specs.items()}}  # fmt: skip
    return PreferenceSet(out, record, cert), stats


def _near(wanted, columns) -> str:
    """The columns close to the wanted names, as " (it has 'x': misspelt?)", or "" when none is."""
    import difflib

    columns = [c for c in columns if c not in wanted]
    near = sorted({m for w in wanted for m in difflib.get_close_matches(w, columns, n=1, cutoff=0.7)})
    return f" (it has {', '.join(map(repr, near))}: misspelt?)" if near else ""


def _is_model_template(template: str) -> bool:
    """A recorded template a score model can take again (not the description of a builtin or a callable)."""
    return template in ("auto", "safe-rlhf", "chat") or ("{prompt}" in template and "{response}" in template)
