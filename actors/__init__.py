"""chat-actors: the actors (one per module), their ports, and the adapters to the world."""
