"""token-proxy: a sidecar that adds OAuth 2.0 client-credentials tokens to outbound requests."""

__version__ = "0.1.0"


def data_path_build() -> str:
    """`compiled` when the data path runs as mypyc-built extensions (see setup.py), else `pure`."""
    from proxy.datapath import messages  # compiled with the others; imports only errors

    return "pure" if messages.__file__.endswith(".py") else "compiled"
