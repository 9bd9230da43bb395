"""Parameter-efficient fine-tuning: adapters attached to a frozen fastsft Transformer (prompt.py: prompt tuning,
P-tuning, prefix tuning)."""
