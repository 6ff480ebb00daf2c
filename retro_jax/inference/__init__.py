"""What evaluation and generation share: a trained model and the retrieval it reads."""
