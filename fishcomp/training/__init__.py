"""Training heads on cached features, and fine-tuning: the fold loop and the trainers the train stage runs."""
