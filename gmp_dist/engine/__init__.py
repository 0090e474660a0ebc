"""The training engine: a readable loop with explicit hook calls; no Ray or MLflow imports here."""
