"""Encoders (FM-BCMRI 3D ViT, MedicalNet 3D ResNets), the task head and PyTorch weight ports."""
