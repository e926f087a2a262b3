"""One owner for each artifact (issue 19), checked through the code's own syntax trees rather than a text search:
no module but the owner reads or writes an artifact's metadata keys, no module subscripts another's record with an
owner's keys, and no module imports a private name from another module. The evaluation report, the refine record and
the rounds report are owned by bridge/reports.py (train/rounds.py builds the rounds' rows).

The owners: the scores table's collect record — bridge/scores_table.py; the dual certificate —
bridge/certificate.py (bridge/dual.py builds its data block, bridge/bias.py its bias block); the preference set —
bridge/preferences.py.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("can_jax", "bridge", "train", "benchmarks")

# Metadata keys in files (bytes) and the keys of each artifact's JSON that only its owner may index.
OWNERS = {
    "bridge/scores_table.py": {
        "bytes": {b"can.collect"},
        "keys": {"logp_ref_exact", "scorer_specs", "not_retokenizing", "unfinished"},
    },
    "bridge/certificate.py": {
        "bytes": set(),
        "keys": {
            "constraints",
            "kkt_residual",
            "min_hessian_eig",
            "hessian_condition",
            "recession_slope",
            "function_evaluations",
            "kkt_tolerance",
            "ess_fraction",
            "reference_expectation",
            "standard_error_note",
            "parent_sha256",
        },  # fmt: skip
    },
    "bridge/preferences.py": {"bytes": {b"can", b"can.certificate"}, "keys": {"certificate_sha256"}},
    # The evaluation report, the refine record and the rounds report.
    "bridge/reports.py": {
        "bytes": set(),
        "keys": {"achieved_gain", "ci95", "insample_gain", "identical_samples", "calibration_prompts_sha256",
                 "test_prompts_sha256", "calibration_half_width", "held_out_ci95", "seconds_measuring",
                 "seconds_aligning"},
    },  # fmt: skip
}
# Modules that build one block of an owner's artifact and may name its keys while doing so.
BUILDERS = {"bridge/dual.py": "bridge/certificate.py", "bridge/bias.py": "bridge/certificate.py",
            "train/rounds.py": "bridge/reports.py"}  # the rows of the rounds report  # fmt: skip


def _modules():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(), filename=str(path))


def _indexed_keys(tree):
    """String keys used as x["key"] or x.get("key"), with their line numbers."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and _text(node.slice):
            yield node.slice.value, node.lineno
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "pop"):
            if node.args and _text(node.args[0]):
                yield node.args[0].value, node.lineno


def _text(node) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def test_artifact_metadata_keys_live_in_their_owner_module():
    problems = []
    for name, tree in _modules():
        for owner, keys in OWNERS.items():
            if name in (owner, *[b for b, o in BUILDERS.items() if o == owner]):
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, bytes) and node.value in keys["bytes"]:
                    problems.append(f"{name}:{node.lineno} writes or reads {node.value!r}, owned by {owner}")
            for key, line in _indexed_keys(tree):
                if key in keys["keys"]:
                    problems.append(f"{name}:{line} indexes {key!r}, a key of {owner}'s artifact")
    assert not problems, "\n".join(problems)


def test_no_module_imports_a_private_name_of_another():
    problems = []
    for name, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private:
                    problems.append(f"{name}:{node.lineno} imports {private} from {node.module}")
    assert not problems, "\n".join(problems)


def test_the_checks_can_fail():
    """The scanners see a violation when there is one (a test that cannot fail is no test)."""
    tree = ast.parse('x = meta[b"can.collect"]\ny = cert["constraints"]\nz = rec.get("certificate_sha256")\n'
                     "from bridge.dual import _number\n")  # fmt: skip
    assert {k for k, _ in _indexed_keys(tree)} >= {"constraints", "certificate_sha256"}
    assert any(isinstance(n, ast.Constant) and n.value == b"can.collect" for n in ast.walk(tree))
    assert any(isinstance(n, ast.ImportFrom) and n.names[0].name == "_number" for n in ast.walk(tree))


def test_can_train_and_label_import_no_jax_for_nothing():
    """`can_jax` is lazy: importing it (or its errors, as the torch stages do) loads no JAX, and neither do the
    modules `can train`, `can label`, `can collect` and `can evaluate` run (JAX loads where a dual is solved)."""
    import subprocess
    import sys

    code = ("import sys, can_jax, can_jax.errors, train.cli, train.dpo, train.label, train.collect, train.evaluate, "
            "bridge.preferences; assert 'jax' not in sys.modules, 'jax imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
