"""token-proxy: a sidecar that adds OAuth 2.0 client-credentials tokens to outbound requests."""

__version__ = "0.1.0"
