"""Stage 3: a segmentation-models-pytorch network trained on pseudo-masks, evaluated on ground truth."""
