"""One training run: the trainer, the LightningModule, checkpoints and resume, run files, sweeps."""
