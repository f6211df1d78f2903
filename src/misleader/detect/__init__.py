"""Extraction-query detectors (SAME: masked-autoencoder reconstruction + auxiliary classifier)."""
