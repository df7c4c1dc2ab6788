"""Models: loading (once), scoring, explanations, rule scores (NEWS2), training and model cards."""
