"""Data bundled with the `modelyard` CLI: `chat.jsonl`, the dataset `modelyard demo` trains on.

`chat.jsonl` holds 30 short conversations (`{"messages": [...]}`, the chat
format) in which the assistant answers plain questions in pirate speak, so a
LoRA adapter trained on it is easy to tell apart from its base model.
"""
