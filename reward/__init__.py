"""The Joint Reward Model and all of its training and evaluation code.

Importing `reward` registers the JRM with transformers, so that after `import reward`,
`AutoConfig.from_pretrained(DIR)` and `AutoModel.from_pretrained(DIR)` return a `JRMConfig` and a `JRM`
(no trust_remote_code). It costs the import of torch and transformers (a few seconds), also for
ShapeEdit's command line; we accept that for the Auto classes working wherever `reward` is imported.
"""

from reward.model import JRM, JRMArgs, JRMConfig

__all__ = ["JRM", "JRMArgs", "JRMConfig", "GenerativeJudge"]


def __getattr__(name: str):
    if name == "GenerativeJudge":
        from reward.generative import GenerativeJudge

        return GenerativeJudge
    raise AttributeError(f"module 'reward' has no attribute {name!r}")
