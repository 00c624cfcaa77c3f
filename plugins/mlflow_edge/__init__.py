"""mlflow-edge: MLflow plugins to convert, quantize, evaluate and promote LLMs for edge hardware."""

__version__ = "0.1.0"
