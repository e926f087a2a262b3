"""Scorers for the tests, imported by `module:function` specs."""


def length(prompts, responses):
    return [float(len(r)) for r in responses]


def boom(prompts, responses):
    raise RuntimeError("scorer exploded")


def nan(prompts, responses):
    return [float("nan")] * len(responses)


def e_share(prompts, responses):
    """Share of the letter 'e' among a response's characters: a utility the tiny LM can learn to raise."""
    return [r.count("e") / (len(r) + 1.0) for r in responses]


def brevity(prompts, responses):
    return [-len(r) / 20.0 for r in responses]


def slow_length(prompts, responses):
    """`length`, slowly: a collection that takes long enough to be killed half-way in a test."""
    import time

    time.sleep(0.4)
    return length(prompts, responses)


def exits(prompts, responses):
    """A scorer that ends the process, as a careless script might."""
    import sys

    sys.exit(0)
