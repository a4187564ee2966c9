"""Using a trained model: the generation engine and the surfaces built on it."""
