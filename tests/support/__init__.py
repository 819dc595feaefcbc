"""Real servers for tests: TLS from a local CA, scripted HTTPS servers, an OAuth 2.0 server."""
