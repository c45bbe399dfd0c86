"""The reference HTTP gateway (docs/contract.md 7): its own process, `bin/chat-actors gateway`,
with gateway.server its composition root. The worker (actors/) never imports it."""
