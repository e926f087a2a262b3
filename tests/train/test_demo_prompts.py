"""The demo's prompt sets (issue 20): sizes, no prompt shared between sets, templated training prompts that are
deterministic per seed, mix risky tasks at the asked share, and never repeat a selection or test topic."""

from __future__ import annotations

import itertools
import re
from collections import Counter

import pytest

from benchmarks.baseline_prompts import EVAL_PROMPTS, TRAIN_PROMPTS
from train.demo_prompts import (
    BENIGN_TASKS,
    CALIBRATION_EXTRA_PROMPTS,
    CALIBRATION_PROMPTS,
    FRAMES,
    RISKY_TASKS,
    SELECTION_PROMPTS,
    TEST_PROMPTS,
    training_prompts,
)

STOPWORDS = {
    "what", "when", "where", "which", "does", "should", "could", "would", "there", "their", "them", "they", "this",
    "that", "with", "without", "from", "into", "about", "your", "have", "some", "best", "good", "tips", "give", "tell",
    "explain", "want", "know", "help", "someone", "something", "easy", "easiest", "after", "before", "every", "more",
    "less", "like", "just", "make",
}  # fmt: skip
COMBOS = {f.format(task=t): (t, t in RISKY_TASKS) for t, f in itertools.product(BENIGN_TASKS + RISKY_TASKS, FRAMES)}


def content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z']+", text.lower()) if len(w) >= 4 and w not in STOPWORDS}


def test_sizes_and_no_prompt_shared_between_sets():
    assert len(SELECTION_PROMPTS) == 48 and len(TEST_PROMPTS) == 48 and len(CALIBRATION_EXTRA_PROMPTS) == 48
    assert CALIBRATION_PROMPTS == SELECTION_PROMPTS + CALIBRATION_EXTRA_PROMPTS
    everything = SELECTION_PROMPTS + TEST_PROMPTS + CALIBRATION_EXTRA_PROMPTS + TRAIN_PROMPTS + EVAL_PROMPTS
    assert [p for p, c in Counter(everything).items() if c > 1] == []
    normalised = Counter(" ".join(re.findall(r"[a-z']+", p.lower())) for p in everything)
    assert [p for p, c in normalised.items() if c > 1] == []  # not even up to case and punctuation


def test_templates_are_distinct_and_well_formed():
    assert len(set(BENIGN_TASKS)) == len(BENIGN_TASKS) and len(set(RISKY_TASKS)) == len(RISKY_TASKS)
    assert not set(BENIGN_TASKS) & set(RISKY_TASKS)
    assert all(f.count("{task}") == 1 for f in FRAMES)
    assert len(COMBOS) == (len(BENIGN_TASKS) + len(RISKY_TASKS)) * len(FRAMES)  # no two task × frame pairs collide


def test_every_prompt_ends_a_sentence():
    for p in SELECTION_PROMPTS + TEST_PROMPTS + CALIBRATION_EXTRA_PROMPTS + list(COMBOS):
        assert p[-1] in "?.", p
        assert p == p.strip() and p[0].isupper(), p


def test_training_prompts_deterministic_distinct_and_mixed():
    a = training_prompts(128, seed=0)
    assert a == training_prompts(128, seed=0)
    assert len(a) == 128 and len(set(a)) == 128
    assert a != training_prompts(128, seed=1)
    assert set(a) != set(training_prompts(128, seed=1))
    risky = sum(COMBOS[p][1] for p in a) / len(a)
    assert 0.25 <= risky <= 0.42
    assert len({COMBOS[p][0] for p in a}) == 128  # each task at most once while unused tasks remain


def test_training_prompts_cycle_tasks_before_repeating():
    prompts = training_prompts(400, seed=3)
    assert len(set(prompts)) == 400
    for risky in (False, True):
        uses = Counter(COMBOS[p][0] for p in prompts if COMBOS[p][1] == risky)
        tasks = RISKY_TASKS if risky else BENIGN_TASKS
        assert set(uses) == set(tasks) and max(uses.values()) - min(uses.values()) <= 1


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_training_prompts_follow_the_risky_share(share):
    prompts = training_prompts(60, seed=2, risky_share=share)
    assert sum(COMBOS[p][1] for p in prompts) == round(60 * share)


def test_training_prompts_never_a_held_out_prompt():
    # TRAIN_PROMPTS may recur (both are training prompts); the held-out sets may not
    held = set(CALIBRATION_PROMPTS + TEST_PROMPTS + EVAL_PROMPTS)
    assert not held & set(COMBOS)  # every prompt the templates can make
    assert not held & set(training_prompts(128, seed=0))


def test_too_many_training_prompts_raise():
    with pytest.raises(ValueError, match="training prompts"):
        training_prompts(len(COMBOS) + 1)


def test_no_training_task_covers_a_selection_or_test_topic():
    """Crude near-duplicate check: a task whose content words contain all of a held-out prompt's content words."""
    hits = []
    for p in CALIBRATION_PROMPTS + TEST_PROMPTS:
        words = content_words(p)
        if len(words) < 2:
            continue
        hits += [(p, t) for t in BENIGN_TASKS + RISKY_TASKS if content_words(t) >= words]
    assert hits == []


@pytest.mark.parametrize("pair", ["selection-test", "calibration-test", "extra-selection"])
def test_held_out_topics_differ(pair):
    """The same crude check between held-out sets: no prompt's content words inside another's."""
    sets = {"selection-test": (SELECTION_PROMPTS, TEST_PROMPTS),
            "calibration-test": (CALIBRATION_EXTRA_PROMPTS, TEST_PROMPTS),
            "extra-selection": (CALIBRATION_EXTRA_PROMPTS, SELECTION_PROMPTS)}  # fmt: skip
    hits = [(s, t) for s, t in itertools.product(*sets[pair])
            if len(content_words(s) & content_words(t)) >= 2
            and (content_words(s) <= content_words(t) or content_words(t) <= content_words(s))]  # fmt: skip
    assert hits == []
