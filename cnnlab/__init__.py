"""cnnlab: CNN experiments as data, trained with Lightning, composed with Hydra, tracked in MLflow."""

__version__ = "0.1.0"
