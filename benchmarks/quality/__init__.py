"""Task suite for measuring whether compressed LoRA adapters keep each task's skill (see tasks.py)."""
