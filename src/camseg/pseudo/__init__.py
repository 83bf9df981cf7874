"""Stage 2: CAMs on the training set -> pseudo-masks, manifest, overlays and quality."""
