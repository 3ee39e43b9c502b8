"""Supervised fine-tuning (`mlx-rft sft`): answer-token loss for time-series and chat rows."""
