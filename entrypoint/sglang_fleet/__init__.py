"""sglang-fleet: multi-node SGLang that assembles itself through Consul."""
__version__ = "0.1.0"
