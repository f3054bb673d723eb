"""Chat messages as training and serving both see them: the roles, and the prompt a model answers.

One definition for every door: training data (``adapterhub.data``), preference and reward data
(``objectives.shapes``) and the server's requests (``serve.requests``) check roles against
:data:`ROLES`, and training and serving render prompts with :func:`render_prompt`, so a served
answer follows exactly the text an adapter was trained on. No torch here.
"""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant")


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The text the model sees before it answers (chat template + generation prompt)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
