"""The Joint Reward Model and all of its training and evaluation code.

`from reward import JRM, JRMArgs` loads torch and transformers on first use only, so ShapeEdit's
command line (`python -m reward.shapeedit`) starts fast.
"""

__all__ = ["JRM", "JRMArgs", "GenerativeJudge"]


def __getattr__(name: str):
    if name in ("JRM", "JRMArgs"):
        from reward import model

        return getattr(model, name)
    if name == "GenerativeJudge":
        from reward.generative import GenerativeJudge

        return GenerativeJudge
    raise AttributeError(f"module 'reward' has no attribute {name!r}")
