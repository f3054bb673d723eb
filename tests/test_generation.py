"""Offline greedy generation: the reference that training demos and the server are checked against."""

from __future__ import annotations

import torch

from adapterhub.base import load_base
from adapterhub.generation import exact_match, generate_texts, greedy_tokens


def test_greedy_tokens_equal_model_generate_for_a_plain_model(tiny_base_dir, tiny_tokenizer):
    model = load_base(tiny_base_dir).model
    prompts = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("abc", "hello", "xyz", "hi")]
    ours = greedy_tokens(model, tiny_tokenizer, prompts, max_new_tokens=6)
    for prompt, got in zip(prompts, ours):
        ids = torch.tensor([prompt])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id)
        ref = ref[0, len(prompt):].tolist()
        assert got == ref[: len(got)] and len(got) == len(ref)


def test_exact_match_counts_right_answers(tiny_base_dir, tiny_tokenizer):
    model = load_base(tiny_base_dir).model
    conversation = [{"role": "user", "content": "say something"}]
    said = generate_texts(model, tiny_tokenizer, [conversation], max_new_tokens=5)[0]
    right = conversation + [{"role": "assistant", "content": said}]
    wrong = conversation + [{"role": "assistant", "content": said + "!"}]
    assert exact_match(model, tiny_tokenizer, [right, wrong], max_new_tokens=5) == 0.5
