"""Scorers for the tests, imported by `module:function` specs."""


def length(prompts, responses):
    return [float(len(r)) for r in responses]


def boom(prompts, responses):
    raise RuntimeError("scorer exploded")


def nan(prompts, responses):
    return [float("nan")] * len(responses)
