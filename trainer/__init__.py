"""dynseg.trainer: the network, its CRFs, losses, datasets, training and evaluation. Needs torch.

`model` (the network: semantic CRF, box, global and shape terms, instance CRF) on `backbones`, `crf`
(the dense CRF: a readable PyTorch reference and a torch op on the native kernel library), `data`
(datasets, detections from a file or simulated), `loss` and `matching` (the matched ground truth),
`boxes`, `train` (with `progress` and `distributed`, its multi-process launch), `evaluation`, `checkpoint`,
and `fields` (the checks of the config dataclasses).
"""

from dynseg.sdk.errors import needs_trainer

try:  # every module here needs it: said once, with how to install it, not as a bare ModuleNotFoundError
    import torch  # noqa: F401
except ImportError as error:
    raise ImportError(needs_trainer("dynseg.trainer", error)) from error
