"""ama-stream: streaming image anomaly detection with Adversarial Mirrored AutoEncoders."""

__version__ = "0.1.0"
