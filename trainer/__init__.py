"""dynseg.trainer: the network, its CRFs, losses, datasets, training and evaluation. Needs torch.

So far: the dense CRF (`dynseg.trainer.crf`), as a readable PyTorch reference and as a torch op
on the native kernel library.
"""
