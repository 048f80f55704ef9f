"""Post-processing of predicted class probabilities (dense CRF)."""
