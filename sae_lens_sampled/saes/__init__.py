"""One module per architecture, each with a training and an inference SAE."""
