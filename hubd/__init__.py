"""hubd: one machine-wide, verified cache of TensorFlow Hub and Kaggle SavedModels."""

__version__ = "0.1.0"
