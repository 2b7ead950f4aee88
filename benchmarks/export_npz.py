"""Write cnnlab's decoded CIFAR-10 copy as an .npz, so other frameworks train on the same pixels."""

import sys
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cnnlab.config.compose import compose  # noqa: E402
from cnnlab.data.sources import load_dataset  # noqa: E402

if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else REPO / "runs" / "cifar10.npz")
    archive = REPO.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"
    cfg = compose([f"data.archive={archive}"])
    data = load_dataset(OmegaConf.to_container(cfg.data, resolve=True), Path(cfg.paths.cache), 0)
    np.savez(out, train_x=data.train_x.numpy(), train_y=data.train_y.numpy(),
             test_x=data.test_x.numpy(), test_y=data.test_y.numpy())
    print(f"wrote {out} ({data.fingerprint()})")
