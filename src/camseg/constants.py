"""Names shared by modules, callbacks, sweeps and reports: defined once here."""

# Stage names and their sub-directories of the run directory.
STAGES = ("cls", "audit", "pseudo", "seg")

# Metric names (logged by LightningModules, read by callbacks, sweeps and reports).
TRAIN_LOSS = "train/loss"
VAL_LOSS = "val/loss"
VAL_AUROC = "val/auroc"
VAL_AP = "val/ap"
VAL_F1 = "val/f1"
VAL_ACC = "val/acc"
TEST_AUROC = "test/auroc"
VAL_DICE = "val/dice"
VAL_IOU = "val/iou"
TEST_DICE = "test/dice"
TEST_IOU = "test/iou"
PSEUDO_DICE = "pseudo/dice"

# Mask conventions.
IGNORE_INDEX = 255
BACKGROUND = 0

# Dataset folder format: columns that are not classes.
RESERVED_COLUMNS = ("image", "mask", "group", "split", "slice")
SPLITS = ("train", "val", "test")

MANIFEST_SCHEMA_VERSION = 1

# Where a CamClassifier's encoder comes from, and the strides it can be cut at (checked both
# when a network is built from config and when one is rebuilt from a checkpoint).
ENCODER_SOURCES = ("torchvision", "timm", "smp")
OUTPUT_STRIDES = (8, 16, 32)
