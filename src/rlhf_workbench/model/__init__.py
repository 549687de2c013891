"""The model: loading, token log-probabilities, rollout (sampling), FSDP sharding, the chat-model client."""
