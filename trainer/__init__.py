"""Training side of splitbits: split model zoo, datasets, Entropic-Student training, checkpoints."""
