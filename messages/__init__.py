"""The message protocol of chat-actors: wire types and mailbox types. No I/O here."""
