"""The built-in training objectives, each an ordinary plugin (``adapterhub_register_objectives``).

``sft`` trains on answers; ``dpo`` and ``kto`` on preferences; ``reward`` trains a reward model;
``grpo`` learns from rewards of its own sampled answers; ``distill`` from a teacher's
distributions. All but ``sft`` run on TRL's trainers (:mod:`.trl_run` holds the shared glue).
"""
