"""Full fine-tuning: every param trains (minus the user's peft.freeze rules)."""


def apply(model, cfg, rngs) -> None:
    del model, cfg, rngs  # no surgery


TRAINABLE_RULES = ((r".*", True),)

OPTIONS = ()  # no config.peft.full block
