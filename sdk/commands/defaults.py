"""The synthetic training run's defaults, which `dynseg train`, `dynseg quickstart` and
`python -m dynseg.trainer.distributed` share: the scenes, the steps, the learning rates, and the
largest seed and image count (`dynseg eval` falls back to the image size, `SyntheticScenes` refuses a
side below the smallest). Torch-free, so that the command line's options read them without loading
the trainer."""

TRAIN_IMAGES = 400  # synthetic training scenes
MAX_IMAGES = 2**63 - 1  # the most a dataset can hold: Python's len() of it must fit in a signed 64-bit int
IMAGE_SIZE = (96, 120)  # their (H, W)
MIN_IMAGE_SIDE = 32  # the smallest side a synthetic scene is drawn at
MAX_IMAGE_SIDE = 4096  # and the largest: scenes are made in memory (100000x100000 would need 149 GiB)
SEMANTIC_STEPS = 600
INSTANCE_STEPS = 100
LEARNING_RATE = 0.02  # stage 1's
INSTANCE_LR_DIVISOR = 20  # stage 2 learns at stage 1's rate divided by this
# Seeds reach torch.manual_seed (at most 2**64 - 1) and numpy, and evaluation holds out seed + 1.
MAX_SEED = 2**63 - 2
