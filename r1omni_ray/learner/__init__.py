"""What a learner rank does, without Ray: the DeepSpeed policy, the GRPO and SFT steps, export."""
