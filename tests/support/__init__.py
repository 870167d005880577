"""Real servers and clients that the tests run on 127.0.0.1."""
