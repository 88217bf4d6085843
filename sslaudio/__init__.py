"""sslaudio: self-supervised audio representation learning."""

__version__ = "0.1.0"
