"""The Alpaca prompt, shared by instruction-tune and the E4SRec stage.

E4SRec reuses the template with the user's item embeddings in place of the input text:
`prefix(instruction)` (which ends with the input header), then the items, then `response_prefix`.
"""

from __future__ import annotations

from dataclasses import dataclass

from e4srec import config as cfg

PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
PREAMBLE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)
RECOMMEND_INSTRUCTION = "Given the user's purchase history, predict next possible item to be purchased."


@dataclass
class PromptOptions:
    """Prompt fields the LLM stages share (flags --instruction, --response-prefix)."""

    instruction: str = cfg.option(RECOMMEND_INSTRUCTION, "the E4SRec task instruction")
    response_prefix: str = cfg.option("\n\n### Response:\n", "text between the input and the answer")


def alpaca(instruction: str, input_text: str = "", response_prefix: str = "\n\n### Response:\n") -> str:
    """The full Alpaca prompt up to where the response starts."""
    if input_text:
        return f"{PREAMBLE_WITH_INPUT}### Instruction:\n{instruction}\n\n### Input:\n{input_text}{response_prefix}"
    return f"{PREAMBLE_NO_INPUT}### Instruction:\n{instruction}{response_prefix}"


def recommendation_prefix(instruction: str = RECOMMEND_INSTRUCTION) -> str:
    """E4SRec's text before the item embeddings: the Alpaca prompt up to and including the input header."""
    return f"{PREAMBLE_WITH_INPUT}### Instruction:\n{instruction}\n\n### Input:\n"
