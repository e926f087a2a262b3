import json

from benchmarks.worlds_bench import BenchConfig, run, steps_to_target


def test_steps_to_target_requires_staying_inside():
    cfg = BenchConfig(viol_tol=0.1, kl_tol=0.1)
    steps = [1, 2, 3, 4, 5]
    assert steps_to_target(steps, [1, 0, 1, 0, 0], [0, 0, 0, 0, 0], cfg) == 4  # left once, came back at 4
    assert steps_to_target(steps, [0, 0, 0, 0, 1], [0, 0, 0, 0, 0], cfg) is None  # outside at the end
    assert steps_to_target(steps, [0] * 5, [0] * 5, cfg) == 1


def test_tiny_bench_writes_a_report(tmp_path):
    cfg = BenchConfig(prompts=60, responses=5, samples=8, ms=(1, 3), budget=200, dpo_steps=50, stat_ns=(60,),
                      stat_ks=(8,), replicates=8)  # fmt: skip
    path = run(cfg, tmp_path)
    text = path.read_text()
    for heading in ("## 1. Statistics", "## 2. Compute", "## 3. Labelling", "## 4. Margin sweep"):
        assert heading in text
    data = json.loads((tmp_path / "report.json").read_text())
    methods = {r["method"] for r in data["compute"]}
    assert {"one-shot CAN", "GDA (η_λ=0.5)", "C-DPO (η_λ=0.5)"} <= methods
    assert {r["mode"] for r in data["labels"]} == {"soft", "bt", "hard"}
    # Soft labels in the population regime recover π*; hard labels are biased away from it.
    soft = next(r for r in data["labels"] if r["mode"] == "soft")
    hard = next(r for r in data["labels"] if r["mode"] == "hard")
    assert soft["kl_to_opt"] < 0.05 < hard["kl_to_opt"]
    for png in ("compute.png", "lambda.png", "frontier.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
