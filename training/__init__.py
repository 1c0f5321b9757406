"""Training and evaluation: data preparation, presets, training loops, held-out metrics."""
