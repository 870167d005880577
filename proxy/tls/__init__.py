"""TLS: contexts for connections to upstreams and token endpoints (`client_context`),
the local CA (`local_ca`) and TLS interception of CONNECT tunnels (`intercept`)."""
