"""The Alpaca-style instruction template, shared by instruction fine-tuning and ``gpt-generate --instruct``.

A record ``{"instruction": I, "input": X, "output": Y}`` becomes the text below (``\\n`` is a newline;
the ``### Input:`` block is left out when X is empty)::

    Below is an instruction that describes a task. Write a response that appropriately completes the request.\\n
    \\n
    ### Instruction:\\n
    I\\n
    \\n
    ### Input:\\n
    X\\n
    \\n
    ### Response:\\n
    Y<|endoftext|>

``format_instruction_prompt(I, X)`` returns everything up to and including ``"### Response:\\n"``
(the model is asked to continue from there); fine-tuning appends ``Y`` and the end-of-text token and
trains on the response part; generation stops at the end-of-text token and prints only what follows
the prompt. This is the template of Alpaca and of Raschka's *Build a Large Language Model (From
Scratch)*, whose ``instruction-data.json`` the project's instruction data comes from.

The prompt ends with a newline, so with the GPT-2 pre-tokenization pattern the response's first word
starts a new piece: encoding ``prompt`` and ``response`` separately gives the same ids as encoding
``prompt + response`` unless the response itself starts with whitespace.
"""

from __future__ import annotations

PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
INSTRUCTION_MARKER = "\n\n### Instruction:\n"
INPUT_MARKER = "\n\n### Input:\n"
RESPONSE_MARKER = "\n\n### Response:\n"


def format_instruction_prompt(instruction: str, input_text: str = "") -> str:
    """The prompt for one instruction (and optional input), ending with ``"### Response:\\n"``."""
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError("the instruction must be a non-empty string")
    if not isinstance(input_text, str):
        raise ValueError("the instruction's input must be a string")
    prompt = PREAMBLE + INSTRUCTION_MARKER + instruction
    if input_text:
        prompt += INPUT_MARKER + input_text
    return prompt + RESPONSE_MARKER
