"""The baseline for (d): a plain PEFT + Trainer script, as a user would write it (no adapterhub
training code; the data is tokenized with adapterhub's loader so both runs see the same ids).

Usage: python -m bench.peft_trainer_script BASE_DIR DATA.jsonl STEPS OUT_JSON
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch


def main(base_dir: str, data: str, steps: int, out_json: str) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from adapterhub.data import load_dataset

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    dataset = load_dataset(data, tokenizer, max_length=512)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))

    def collate(batch):
        width = max(len(x["input_ids"]) for x in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, x in enumerate(batch):
            n = len(x["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(x["input_ids"]), torch.tensor(x["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    with tempfile.TemporaryDirectory() as run_dir:
        args = TrainingArguments(output_dir=run_dir, per_device_train_batch_size=8, max_steps=steps, learning_rate=2e-4,
                                 seed=0, logging_steps=10, save_strategy="no", report_to="none", disable_tqdm=True,
                                 remove_unused_columns=False, dataloader_num_workers=0, use_cpu=True)
        output = Trainer(model=model, args=args, data_collator=collate, train_dataset=dataset).train()
    with open(out_json, "w") as f:
        json.dump({"train_runtime_s": output.metrics["train_runtime"], "steps": steps}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
