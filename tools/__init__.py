"""Tools around the worker: the command line, the embedded local stack, `dev`, ingest, a
small client of the contract. They wire adapters together like the supervisor does; no
actor imports them."""
