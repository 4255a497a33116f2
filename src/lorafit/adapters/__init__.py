"""What is trained on top of the frozen base: LoRA layers, the classifier head, their accounting and files."""
